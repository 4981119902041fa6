"""Run `edgecl ARGS...` from this source tree with no install (the arm64 Python under qemu has none).

pyproject maps the package edgecl.cli to the top-level cli/ folder, so a plain PYTHONPATH=REPO finds
edgecl but not edgecl.cli: this launcher registers cli/ as edgecl.cli the way the installed package
lays it out, then calls the real entry point (edgecl.cli.main:main).

With EDGECL_ORT_PROBE=FILE it also writes, at exit, which machine and onnxruntime ran the command
and how many times each model file's InferenceSession was run: the proof that the step graph
(train_step.onnx) really ran on this runtime. The probe subclasses InferenceSession only to count;
every call goes to the real session.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _mount_cli() -> None:
    sys.path.insert(0, str(REPO))
    import edgecl

    cli = REPO / "cli"
    spec = importlib.util.spec_from_file_location("edgecl.cli", cli / "__init__.py",
                                                  submodule_search_locations=[str(cli)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["edgecl.cli"] = module
    edgecl.cli = module  # type: ignore[attr-defined]
    spec.loader.exec_module(module)


def _install_probe(out: Path) -> None:
    import onnxruntime as ort

    runs: Counter[str] = Counter()
    opened: Counter[str] = Counter()
    real = ort.InferenceSession

    class CountingSession(real):  # type: ignore[misc, valid-type]
        def __init__(self, path_or_bytes, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            self._edgecl_name = Path(os.fspath(path_or_bytes)).name if isinstance(
                path_or_bytes, (str, os.PathLike)) else "<bytes>"
            super().__init__(path_or_bytes, *args, **kwargs)
            opened[self._edgecl_name] += 1

        def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            result = super().run(*args, **kwargs)
            runs[self._edgecl_name] += 1
            return result

    ort.InferenceSession = CountingSession

    def write() -> None:
        import numpy

        out.write_text(json.dumps({
            "machine": platform.machine(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__, "numpy": numpy.__version__,
            "providers": ort.get_available_providers(), "sessions_opened": dict(opened),
            "session_runs": dict(runs)}, indent=1))

    atexit.register(write)


def main() -> None:
    _mount_cli()
    probe = os.environ.get("EDGECL_ORT_PROBE")
    if probe:
        _install_probe(Path(probe))
    from edgecl.cli.main import main as edgecl_main

    sys.argv[0] = "edgecl"
    edgecl_main()


if __name__ == "__main__":
    main()
