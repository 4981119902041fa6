"""`make bench`: run the benchmark scripts one after another (B4, B2, B3, B5, then the B1 and B6
experiments of b1_b6_accuracy/experiments.py through b1_b6_accuracy/run.py, the longest).

Each prints its table and writes JSON + PNG under benchmarks/out/. Timings on a shared machine are
noisy: each script measures its comparisons side by side in one run. The folders and what each
benchmark measures: benchmarks/README.md.

  .venv/bin/python benchmarks/run_all.py            # every benchmark, the full protocol
  .venv/bin/python benchmarks/run_all.py --quick    # B1 / B6 smoke experiments; B2 with 1 repeat
  .venv/bin/python benchmarks/run_all.py --only b4,b2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# Run as `python benchmarks/run_all.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared import common

# Script paths are relative to benchmarks/; B4 runs first because B2 and B3 reuse its bundle and data.
SCRIPTS = {
    "b4": ["b4_export/b4_export.py"],
    "b2": ["b2_device_cost/b2_device_cost.py"],
    "b3": ["b3_delta/b3_delta.py"],
    "b5": ["b5_server/b5_server.py"],
    "b1": ["b1_b6_accuracy/run.py", "defaults_b1"],
    "b6": ["b1_b6_accuracy/run.py", "defaults_b6"],
}
QUICK = {"b1": ["b1_b6_accuracy/run.py", "smoke_b1"], "b6": ["b1_b6_accuracy/run.py", "smoke_b6"],
         "b2": ["b2_device_cost/b2_device_cost.py", "--repeats", "1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the edgecl benchmarks")
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of b1..b6")
    ap.add_argument("--quick", action="store_true", help="smaller B1/B2 settings (stated in their JSON)")
    args = ap.parse_args()
    unknown = [n for n in args.only.split(",") if n not in SCRIPTS]
    if unknown:
        raise SystemExit(f"error: unknown benchmark {', '.join(unknown)}: choose from {', '.join(SCRIPTS)}")
    common.require_time_bin()
    failed = []
    for name in args.only.split(","):
        argv = QUICK[name] if args.quick and name in QUICK else SCRIPTS[name]
        script = common.BENCH_DIR / argv[0]
        if not script.exists():
            print(f"== {name}: {argv[0]} not in this checkout; skipped", flush=True)
            continue
        cmd = [sys.executable, str(script), *argv[1:]]
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=common.REPO).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
