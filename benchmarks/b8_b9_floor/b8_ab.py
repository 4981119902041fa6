"""B8 A/B: this tree's `edgecl watch` against an older tree's, interleaved on the same cores (and torch beside).

    git archive REV | tar -x -C /tmp/old            # the old code, as a plain tree
    .venv/bin/python benchmarks/b8_b9_floor/b8_ab.py --old /tmp/old --bundle DIR --repeats 5 [--torch]

Each round runs old watch, new watch (and torch with --torch) once, each its own process pinned with
taskset like b8_serving.py, with this venv's Python; the old tree's worker imports the old edgecl.
On a shared machine the load drifts between rounds, so the speedup reported is the median of the
per-round ratios (new / old in the same round), beside the best and median images/s of each side
and the median images per CPU-second of the serving loop (less sensitive to the other processes).
Writes out/floor/b8_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.b8_b9_floor.b8_serving import WORKER, prepare  # noqa: E402
from benchmarks.shared.common import machine, print_table, run_timed, thread_env, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a tree of the old code (git archive REV | tar -x)")
    ap.add_argument("--bundle", type=Path, default=None, help="a Lite0 64 px bundle (default: export one)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="run torch's forward in each round too")
    args = ap.parse_args()
    old_worker = args.old.resolve() / "benchmarks" / "b8_b9_floor" / "b8_worker.py"
    if not old_worker.is_file():
        sys.exit(f"error: {old_worker} does not exist: pass --old DIR holding a tree of the old code")
    camera, flat, bundle = prepare(args.images, args.bundle)
    sides = [("old", old_worker, "watch", camera), ("new", WORKER, "watch", camera)]
    if args.torch:
        sides.append(("torch", WORKER, "torch", flat))
    load_before = os.getloadavg()
    results, rows = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        cores = "0" if threads == 1 else f"0-{threads - 1}"
        runs: dict[str, list[dict]] = {name: [] for name, *_ in sides}
        for _ in range(args.repeats):
            for name, worker, kind, folder in sides:
                timed = run_timed(["taskset", "-c", cores, sys.executable, str(worker), kind, str(bundle),
                                   str(folder), str(threads), str(args.batch)], env=thread_env(threads))
                runs[name].append({**json.loads(timed.stdout.strip().splitlines()[-1]),
                                   "peak_rss_mib": timed.max_rss_mib, "load_1min": os.getloadavg()[0]})
        ips = {name: [r["images_per_s"] for r in rs] for name, rs in runs.items()}
        ratio = [n / o for n, o in zip(ips["new"], ips["old"], strict=True)]
        summary = {"threads": threads, "cores": cores, "runs": runs, "new_over_old_per_round": ratio,
                   "new_over_old_median": statistics.median(ratio)}
        if args.torch:
            summary["new_over_torch_per_round"] = [n / t for n, t in zip(ips["new"], ips["torch"], strict=True)]
            summary["new_over_torch_median"] = statistics.median(summary["new_over_torch_per_round"])
        results.append(summary)
        for name, values in ips.items():
            rows.append([threads, name, " / ".join(f"{v:.0f}" for v in values), max(values), statistics.median(values),
                         statistics.median(r.get("images_per_cpu_s", float("nan")) for r in runs[name]),
                         statistics.median(r["p50_ms"] for r in runs[name]),
                         max(r["peak_rss_mib"] for r in runs[name])])
        rows.append([threads, "new / old (median of rounds)", " / ".join(f"{r:.2f}" for r in ratio), "",
                     summary["new_over_old_median"], "", "", ""])
        if args.torch:
            rows.append([threads, "new / torch (median of rounds)",
                         " / ".join(f"{r:.2f}" for r in summary["new_over_torch_per_round"]), "",
                         summary["new_over_torch_median"], "", "", ""])
    path = write_json("floor/b8_ab.json", {"benchmark": "B8 A/B", "machine": machine(),
                                           "args": {k: str(v) for k, v in vars(args).items()},
                                           "load_average_before": load_before,
                                           "load_average_after": os.getloadavg(), "results": results})
    print_table(["threads", "side", "images/s per round", "best", "median", "images/CPU-s median", "p50 ms",
                 "peak RSS MiB"], rows)
    print("wrote", path)

if __name__ == "__main__":
    main()
