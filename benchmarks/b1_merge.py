"""Merge the runs of several B1 result files (same protocol, e.g. seeds run as separate processes)
and recompute the lr choice and the mean +- std tables, as b1_accuracy.py does for one file.

Run: .venv/bin/python benchmarks/b1_merge.py out/b1_accuracy_a.json out/b1_accuracy_b.json --tag _ab
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from b1_accuracy import finalize

SAME = ("size", "epochs", "batch_size", "select_rate", "drop_rate", "train_per_class", "val_per_class",
        "test_per_class", "exemplars", "replay_share", "old_update")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tag", required=True, help="suffix of the merged output files")
    args = ap.parse_args()
    loaded = [json.loads(f.read_text()) for f in args.files]
    first = loaded[0]["config"]
    for f, r in zip(args.files[1:], loaded[1:], strict=True):
        differ = [k for k in SAME if r["config"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{f} was run with other settings ({', '.join(differ)}); not merged")
    seen, runs = set(), []
    for r in loaded:
        for run in r["runs"]:
            key = (run["label"], run["lr"], run["seed"])
            if key not in seen:  # a run present in two files: the first file's
                seen.add(key)
                runs.append(run)
    heads = tuple(h for h in first.get("heads", "").split(",") if h)
    results = {"machine": loaded[0]["machine"], "config": first, "merged_from": [str(f) for f in args.files],
               "runs": runs}
    finalize(results, heads, first["size"], sorted({r["seed"] for r in runs}), args.tag)


if __name__ == "__main__":
    main()
