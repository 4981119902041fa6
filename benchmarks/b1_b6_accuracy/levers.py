"""Issue 12's lever table: every ablation arm on B1 and B6 side by side, best head against frozen's best head.

Reads the summaries `run.py` wrote (default out/ablation_b1.json and out/ablation_b6.json, whose runs
include the confirm_* seeds: they share the run folder) and prints, per arm, the validation mean
accuracy minus frozen's (the criterion every choice uses) on each benchmark and their average, then
the test numbers, each minus frozen's best head's: last accuracy (every task / domain after the last
step), the first and the last task / domain (B6's goal is on its first and last camera). Nothing is
trained here; the table is written to out/levers.json.

Run: .venv/bin/python benchmarks/b1_b6_accuracy/levers.py [benchmarks/out/ablation_b1.json benchmarks/out/ablation_b6.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Run as `python benchmarks/b1_b6_accuracy/levers.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shared import common


def best(summary: dict[str, Any], arm: str) -> dict[str, Any]:
    s = summary[arm]
    return s["families"][s["best"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path,
                    default=[common.OUT / "ablation_b1.json", common.OUT / "ablation_b6.json"])
    args = ap.parse_args()
    results = [json.loads(f.read_text()) for f in args.files]
    names = [r["experiment"]["bench"].upper() for r in results]
    arms = list(dict.fromkeys(a for r in results for a in r["summary"]))
    rows, raw = [], []
    for arm in arms:
        row: list[Any] = [arm]
        cells: dict[str, Any] = {"arm": arm}
        deltas = []
        for name, r in zip(names, results, strict=True):
            if arm not in r["summary"] or "frozen" not in r["summary"]:
                row += ["-"] * 6
                continue
            c, f = best(r["summary"], arm), best(r["summary"], "frozen")
            d_val = c["mean_val"] - f["mean_val"]
            deltas.append(d_val)
            row += [f"{c['head']} ({len(c['seeds'])})", f"{d_val:+.1f}",
                    f"{c['last_test'] - f['last_test']:+.1f} +- {c['last_test_std']:.1f}",
                    f"{c['first_group_test'] - f['first_group_test']:+.1f}",
                    f"{c['last_group_test'] - f['last_group_test']:+.1f}",
                    f"{c['digits_after'] - c['digits_before']:+.1f}"]
            cells[name] = {"head": c["head"], "seeds": c["seeds"], "val_mean_vs_frozen": d_val,
                           "test_last_vs_frozen": c["last_test"] - f["last_test"],
                           "test_last_std": c["last_test_std"], "forgetting_test": c["forgetting_test"],
                           "first_group_test_vs_frozen": c["first_group_test"] - f["first_group_test"],
                           "last_group_test_vs_frozen": c["last_group_test"] - f["last_group_test"],
                           "digits_change": c["digits_after"] - c["digits_before"]}
        avg = sum(deltas) / len(deltas) if len(deltas) == len(results) else None
        row.append("-" if avg is None else f"{avg:+.1f}")
        cells["val_mean_vs_frozen_avg"] = avg
        rows.append(row)
        raw.append(cells)
    headers = ["arm"]
    for name in names:
        headers += [f"{name} best head (seeds)", f"{name} val mean vs frozen", f"{name} test last vs frozen",
                    f"{name} first task/domain vs frozen", f"{name} last task/domain vs frozen", f"{name} digits"]
    headers.append("val mean vs frozen, average")
    table = common.print_table(headers, rows)
    common.write_json("levers.json", {"files": [str(f) for f in args.files], "rows": raw, "table": table,
                                      "machine": common.machine()})


if __name__ == "__main__":
    main()
