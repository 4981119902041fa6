"""`make bench`: run the benchmark scripts one after another (B4, B2, B3, B5, then B1, the longest,
and B1 with old classes kept right, issue 6).

Each script prints its table and writes JSON + PNG under benchmarks/out/. Timings on a shared
machine are noisy: each script measures its comparisons side by side in one run.

  .venv/bin/python benchmarks/run_all.py            # the BENCHMARKS.md protocol (B1: lr grid, 5 epochs)
  .venv/bin/python benchmarks/run_all.py --quick    # B1 with one lr (1e-2) and 2 epochs; B2 with 1 repeat
  .venv/bin/python benchmarks/run_all.py --only b4,b2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import common

SCRIPTS = {
    "b4": ["b4_export.py"],
    "b2": ["b2_device_cost.py"],
    "b3": ["b3_delta.py"],
    "b5": ["b5_server.py"],  # the fleet helper's
    "b1": ["b1_accuracy.py"],
    # issue 6: old classes kept right (exemplars replayed, prototypes moved by their drift), extra heads
    "b1keep": ["b1_accuracy.py", "--methods", "frozen,mist,edgecl_keep", "--variants", "replay",
               "--lrs", "1e-3,1e-2", "--exemplars", "20", "--replay-share", "0.5", "--old-update", "shift",
               "--heads", "lda,ranpac", "--seeds", "1993,7,42", "--tag", "_keep64"],
}
QUICK = {"b1": ["--lrs", "1e-2", "--epochs", "2"], "b2": ["--repeats", "1"],
         "b1keep": ["--epochs", "2", "--seeds", "1993"]}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the edgecl benchmarks")
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of b1..b5, b1keep")
    ap.add_argument("--quick", action="store_true", help="smaller B1/B2 settings (stated in their JSON)")
    args = ap.parse_args()
    common.require_time_bin()
    failed = []
    for name in args.only.split(","):
        script = common.BENCH_DIR / SCRIPTS[name][0]
        if not script.exists():
            print(f"== {name}: {script.name} not in this checkout; skipped", flush=True)
            continue
        cmd = [sys.executable, str(script), *SCRIPTS[name][1:], *(QUICK.get(name, []) if args.quick else [])]
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
