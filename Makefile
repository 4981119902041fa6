# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgecl-installed
MIN_FREE_GIB ?= 8

.PHONY: demo test lint bench clean-venv data system-deps test-aarch64

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch's wheel alone unpacks to ~5.5 GB: say so before pip fails half-way with ENOSPC.
	@free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4/1048576)}'); \
	  if [ "$$free" -lt $(MIN_FREE_GIB) ] && ! $(PY) -c 'import torch' 2>/dev/null; then \
	    echo "only $$free GiB free under $(VENV); the environment needs about $(MIN_FREE_GIB) GiB: free disk space or set VENV=/a/roomier/path"; exit 1; fi
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision come from local disk on this machine kind (see README "Install").
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[host,device,server,dev]'
	# The device trains on plain onnxruntime; onnxruntime-training (deprecated after 1.19.2) owns the
	# same `onnxruntime` module and would silently replace it: refuse an environment that has it.
	! $(PY) -m pip show -q onnxruntime-training onnxruntime-training-cpu 2>/dev/null
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package (offline data); installed when missing and root.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	    else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; }

# Real parts the tests use: headless Chromium (the dashboard test) and a PostgreSQL server (the fleet
# on PostgreSQL), from Debian; installed when missing and root.
system-deps:
	@{ test -x /usr/bin/chromium && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium postgresql; \
	    else echo "missing chromium/postgresql: run 'sudo apt-get install chromium postgresql'"; exit 1; fi; }

demo: $(STAMP) data
	$(VENV)/bin/edgecl demo --out demo-out

test: $(STAMP) data system-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check edgecl cli tests benchmarks scripts
	$(VENV)/bin/mypy

# B2/B4 measure whole-process peak RSS with GNU time (`/usr/bin/time -v`): installed when missing and root.
bench: $(STAMP) data
	@test -x /usr/bin/time || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q time; \
	    else echo "GNU time missing: run 'sudo apt-get install time'"; exit 1; fi; }
	$(PY) benchmarks/run_all.py

# The device path (adapt, predict, eval, delta) on an arm64 CPython under qemu-user emulation, compared with
# the x86_64 run: not part of `make test` (minutes). The set-up (root, once) installs qemu-user-static and
# downloads arm64 .debs and aarch64 wheels into .cache/aarch64; the check itself downloads nothing.
test-aarch64: $(STAMP)
	bash scripts/aarch64/setup.sh .cache/aarch64
	$(PY) scripts/aarch64/check.py --cache .cache/aarch64
