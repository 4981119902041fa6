"""Issue 6's ablation table, assembled from B1 result files (no training here).

Each row is one run of `b1_accuracy.py` (one seed): which rule kept old classes right (none, semantic
drift compensation, exemplars recomputing or shifting the prototypes, exemplars replayed in training
and how often), the learning rate, and the head. For the lda / ranpac heads the parameter with the best
validation mean A_t of that run is used (the same rule as the lr). Every number is read from the JSON
files named on the command line; nothing is typed in.

Run: .venv/bin/python benchmarks/b1_ablation.py results/b1_accuracy_issue6.json results/... [--seed 1993]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import common


def _rule(run: dict[str, Any], config: dict[str, Any]) -> str:
    label = run["label"]
    if label in ("frozen", "full_ft") or label in ("mist", "edgecl"):
        return "-"
    if label == "mist+sdc":
        return "drift compensation (SDC)"
    n = config.get("exemplars", 0)
    update = "shift" if config.get("old_update") == "shift" else "recompute"
    text = f"{n} exemplars/class, {update}"
    if "replay" in label:
        share = config.get("replay_share") or 0.0
        text += f", replay {'x1' if not share else f'share {share:g}'}"
    return text


def rows_of(path: Path, seed: int) -> list[dict[str, Any]]:
    results = json.loads(path.read_text())
    config = results["config"]
    rows = []
    for run in results["runs"]:
        if run["seed"] != seed:
            continue
        lr = "-" if run["lr"] is None else f"{run['lr']:g}"
        base = {"file": path.name, "size": config["size"], "method": run["label"], "lr": lr,
                "old classes": _rule(run, config), "digits": f"{run['digits_before']:.1f} -> {run['digits_after']:.1f}"}
        rows.append(base | {"head": "ncm", **_metrics(run)})
        families: dict[str, list[str]] = {}
        for key in run.get("heads", {}):
            families.setdefault(key.split(":")[0], []).append(key)
        for keys in families.values():
            best = max(keys, key=lambda k: run["heads"][k]["mean_A_val"])
            rows.append(base | {"head": best, **_metrics(run["heads"][best])})
    return rows


def _metrics(h: dict[str, Any]) -> dict[str, float]:
    return {"A_2": h["A_test"][1], "last": h["last_test"], "mean A_t": h["mean_A_test"],
            "forgetting": h["forgetting_test"], "val mean A_t": h["mean_A_val"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--size", type=int, default=None, help="keep only runs at this input size")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    rows, seen = [], set()
    for r in (r for f in args.files for r in rows_of(f, args.seed) if args.size in (None, r["size"])):
        key = (r["method"], r["lr"], r["old classes"], r["head"])
        if key not in seen:  # the same configuration in several files: the first file's run
            seen.add(key)
            rows.append(r)
    headers = ["method", "lr", "old classes", "head", "A_2", "last", "mean A_t", "forgetting", "val mean A_t",
               "digits", "file"]
    table = common.print_table(headers, [[r[h] if not isinstance(r[h], float) else round(r[h], 1) for h in headers]
                                         for r in rows])
    common.write_json(f"b1_ablation{args.tag}.json", {"seed": args.seed, "rows": rows, "table": table,
                                                       "files": [str(f) for f in args.files]})


if __name__ == "__main__":
    main()
