"""Shared pieces of the benchmark scripts: the B1 / B6 streams, the machine's description, `/usr/bin/time -v`.

Benchmarks are run by hand or by `make bench`, never by the test suite (docs/benchmarks.md#protocol). Everything
they write goes under benchmarks/out/ (git-ignored); RESULTS.md quotes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"
DATA = OUT / "data"
RECIPE = REPO / "models" / "efficientnet_lite0.toml"
TIME_BIN = Path("/usr/bin/time")

if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from edgecl.datasets import (  # noqa: E402
    FASHION_CLASSES,
    SEED,
    fashion_task_groups,
    write_digits_proxy,
    write_fashion_groups,
)
from edgecl.formats.images import load_image_folder  # noqa: E402


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Split:
    pixels: np.ndarray   # [N, H, W, 3] uint8, resized to the model's input size
    labels: np.ndarray   # [N] int64 global class ids (Fashion-MNIST label, or digit)


@dataclass
class Task:
    name: str                        # task-<t> (B1) or domain-<d>-<camera> (B6)
    classes: list[int]               # the classes its images hold
    train: Split
    val: Split                       # held out from the train file, for hyper-parameters
    test: Split
    folder: Path                     # <folder>/{train,val,test}: the image folders the CLI path reads


@dataclass
class Stream:
    kind: str                        # "class" (B1: new classes per task) or "domain" (B6: new camera per task)
    tasks: list[Task]
    digits_train: Split              # the never-trained source proxy (retention)
    digits_test: Split


def _load(folder: Path, size: list[int], interpolation: str, names: tuple[str, ...] | None) -> Split:
    loaded = load_image_folder(folder, size, interpolation)
    if names is None:  # digits: class folder "digit-<d>"
        ids = [int(c.rsplit("-", 1)[1]) for c in loaded.classes]
    else:
        ids = [names.index(c) for c in loaded.classes]
    return Split(loaded.pixels, np.asarray(ids, np.int64)[loaded.labels])


def _task(name: str, folder: Path, size: list[int], interpolation: str) -> Task:
    splits = {s: _load(folder / s, size, interpolation, FASHION_CLASSES) for s in ("train", "val", "test")}
    return Task(name, sorted({int(c) for c in splits["train"].labels}), splits["train"], splits["val"],
                splits["test"], folder)


def _digits(size: list[int], interpolation: str, seed: int) -> tuple[Split, Split]:
    root = write_digits_proxy(DATA / f"digits-s{seed}", seed=seed)
    return _load(root / "train", size, interpolation, None), _load(root / "test", size, interpolation, None)


def b1_stream(size: list[int], train: int, val: int, test: int, seed: int = SEED,
              interpolation: str = "bilinear") -> Stream:
    """B1: Fashion-MNIST 5 tasks x 2 classes (order 0..9), a fixed per-class subsample."""
    groups = fashion_task_groups()
    root = write_fashion_groups(DATA / f"fashion-mnist-{train}-{val}-{test}-s{seed}", groups, train_per_class=train,
                                val_per_class=val, test_per_class=test, seed=seed)
    return Stream("class", [_task(g, root / g, size, interpolation) for g in groups], *_digits(size, interpolation, seed))


def b6_stream(size: list[int], train: int, val: int, test: int, seed: int = SEED,
              interpolation: str = "bilinear", domains: tuple[str, ...] | None = None) -> Stream:
    """B6: the same 10 classes through one camera after another (benchmarks/domains.py)."""
    from domains import DOMAINS, domain_dir, write_domain_stream
    names = tuple(domains or DOMAINS)
    root = write_domain_stream(DATA / f"fashion-domains-{train}-{val}-{test}-s{seed}", train, val, test, seed, names)
    return Stream("domain", [_task(domain_dir(d, n), root / domain_dir(d, n), size, interpolation)
                             for d, n in enumerate(names)], *_digits(size, interpolation, seed))


def concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.pixels for s in splits]), np.concatenate([s.labels for s in splits]))


# -- machine and provenance ------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        mem_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions: dict[str, str] = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "timm", "onnx", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # optional: a device-only process has no torch
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
            "versions": versions, "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_json(name: str, obj: Any) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# -- processes -------------------------------------------------------------------------------------
def edgecl_cmd() -> list[str]:
    """How to run the `edgecl` CLI: the installed script next to this Python, else the module."""
    script = Path(sys.executable).with_name("edgecl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "edgecl.cli.main"]


def require_time_bin() -> None:
    if not TIME_BIN.exists():
        raise SystemExit("/usr/bin/time is missing: run `sudo apt-get install -y time` (B2/B4 measure whole-"
                         "process peak RSS with `/usr/bin/time -v`)")


@dataclass
class Timed:
    returncode: int
    wall_s: float
    max_rss_mib: float
    stdout: str
    stderr: str


def run_timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              check: bool = True) -> Timed:
    """Run ``cmd`` under `/usr/bin/time -v`: wall time and whole-process peak RSS (children included
    only if they are waited for; RSS is the largest of the process tree's members as GNU time reports)."""
    require_time_bin()
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([str(TIME_BIN), "-v", *cmd], capture_output=True, text=True, env=full_env, cwd=cwd)
    wall = time.perf_counter() - t0
    rss_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return Timed(proc.returncode, wall, int(rss_kib.group(1)) / 1024 if rss_kib else float("nan"),
                 proc.stdout, proc.stderr)


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads), "EDGECL_THREADS": str(threads)}


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
