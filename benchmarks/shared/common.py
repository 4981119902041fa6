"""Helpers every benchmark script shares: where results go, the machine's description, tables, JSON,
and whole-process timing under `/usr/bin/time -v`.

Benchmarks are run by hand or by `make bench`, never by the test suite (docs/benchmarks.md#protocol). Everything
they write goes under benchmarks/out/ (git-ignored); RESULTS.md quotes it, and the files it quotes are
copied to benchmarks/results/.
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

BENCH_DIR = Path(__file__).resolve().parents[1]   # benchmarks/
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"
DATA = OUT / "data"
RECIPE = REPO / "models" / "efficientnet_lite0.toml"
TIME_BIN = Path("/usr/bin/time")


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
