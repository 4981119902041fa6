"""B7, mode 1: do other ways of combining the devices' deltas serve the fleet better? (docs/server.md#interference)

    .venv/bin/python benchmarks/b7_fleet/merge_options.py --runs OUT/seed-1993 OUT/seed-7 OUT/seed-42 [--rounds 1 2]

Reads finished `run.py` seed folders of mode 1 (images stay on the devices) in which no round was
published (every round's current version is v1, as in the full-size runs of 2026-12-06), and scores,
on the same deltas the devices pushed, every merge option below like with like:

- the product's rules (`edgecl.formats.merge`): ``ties`` (shipped), ``weighted-mean``, ``trimmed-mean``,
  ``median``; each device's weight is its samples_seen capped at half the total, as the server does;
- rules the product does not ship, written here: ``sum@S`` (task arithmetic: S x the sum of the
  deltas), ``ties-trim@P`` (TIES-merging's trim: each device keeps its top P share of values by
  magnitude, then ``ties``), ``ties-sum@S`` (sign election, the agreeing values summed, not
  averaged, x S), ``max-magnitude`` (per element the value of largest magnitude);
- ``frozen`` (v1 itself) and each device's own delta alone.

Each merged step goes through the release's int4 quantization (`quantize_step`). Under each backbone
the LDA head is built from what a statistics round sums: every class's mean from the images the
round used (the calibration images the export read; each device's training images of its own
classes in round R: the task folder of its last adaptation, which `edgecl restat` embeds), the pooled scatter of the calibration classes dense plus each device's at
rank 16 (what `edgecl restat` sends), shrunk as the devices shrink it. It then classifies the test
images of every group. It approximates the gate's statistics (the devices also embed their
exemplars) and reproduces run.py's scored rows within about a point per group.

Also counts, for frozen and the shipped rule, where the wrong answers on each group went (a class of
the same group, the calibration classes, another device's classes).

Writes OUT (default benchmarks/out/b7_merge_options.json) and prints markdown tables: per round,
the mean over the runs of every group, the groups below frozen, the overall gain, and the
interference cost (device alone - option on the device's own classes, mean over devices and runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.b7_fleet.run import DEVICES  # noqa: E402

PRODUCT_RULES = ("ties", "weighted-mean", "trimmed-mean", "median")
DEFAULT_OPTIONS = ["ties", "weighted-mean", "median", "sum@0.5", "ties-trim@0.2", "ties-trim@0.5", "ties-sum@0.7",
                   "max-magnitude"]
MAX_SHARE = 0.5          # edgecl.formats.merge.DEFAULT_MAX_SHARE
DEVICE_RANK = 16         # edgecl.formats.scatter.RANK_DEVICE


def _agreeing(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Which devices' values [n, K] have the sign their weighted sum elects (weights [n, 1]; a tie: +)."""
    sign = np.where((w * v).sum(0) >= 0, 1.0, -1.0)
    return (np.sign(v) == sign) & (v != 0)


def merge(option: str, dense: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The merged K-vector (float32) of the devices' dense deltas under ``option``."""
    from edgecl.formats.merge import MergeInput, get_strategy

    k = dense[0].size
    if option in PRODUCT_RULES:
        inputs = [MergeInput(np.flatnonzero(v), v[v != 0], float(wt), None) for v, wt in zip(dense, weights, strict=True)]
        result = get_strategy(option).merge(inputs, k)
        out = np.zeros(k, np.float32)
        out[result.positions] = result.values
        return out
    v = np.stack(dense).astype(np.float64)
    w = np.asarray(weights, np.float64)[:, None]
    name, _, arg = option.partition("@")
    if name == "sum":
        return (float(arg) * v.sum(0)).astype(np.float32)
    if name == "max-magnitude":
        return v[np.abs(v).argmax(0), np.arange(k)].astype(np.float32)
    if name == "ties-trim":
        for row in v:               # each device keeps its largest values (TIES-merging's "trim")
            changed = np.abs(row[row != 0])
            if changed.size:
                row[np.abs(row) < np.quantile(changed, 1.0 - float(arg))] = 0.0
        agree = _agreeing(v, w)
        num, den = (w * v * agree).sum(0), (w * agree).sum(0)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)
    if name == "ties-sum":
        agree = _agreeing(v, w)
        return (float(arg) * (v * agree).sum(0)).astype(np.float32)
    raise SystemExit(f"unknown option {option!r}")


def _images(folders: list[Path], size: tuple[int, int], interpolation: str, keep: set[str] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    from edgecl.formats.images import load_image_folder

    pixels, labels = [], []
    for folder in folders:
        im = load_image_folder(folder, size, interpolation, progress=False)
        rows = [i for i, label in enumerate(im.labels) if keep is None or im.classes[label] in keep]
        pixels.append(im.pixels[rows])
        labels += [im.classes[im.labels[i]] for i in rows]
    return np.concatenate(pixels), np.asarray(labels)


def _own_classes(folder: Path, device: str) -> set[str]:
    return {c.name for c in folder.iterdir() if int(c.name.split("-", 1)[0]) in DEVICES[device][0]}


def score_round(run: Path, r: int, options: list[str]) -> dict[str, Any]:
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
    from edgecl.device.state import open_bundle
    from edgecl.formats import delta as delta_format
    from edgecl.formats import manifest as mf
    from edgecl.formats.merge import capped_shares
    from edgecl.formats.scatter import Scatter, class_scatter, pooled
    from edgecl.formats.weights_patch import quantize_step

    v1 = run / "v1"
    m = mf.load_manifest(v1)
    size, interp = (int(m.input_size[0]), int(m.input_size[1])), m.interpolation
    bundle = open_bundle(v1)
    k = bundle.mask.total_selected
    tests = {g.name: _images([g], size, interp) for g in sorted((run / "data" / "test").iterdir())}
    calib = _images([run / "data" / "calib"], size, interp)
    own = {d: _own_classes(run / "data" / d / "train-1", d) for d in DEVICES}
    owner = {c: d for d, classes in own.items() for c in classes}
    held = {d: _images([run / "data" / d / f"train-{r}"], size, interp, own[d]) for d in DEVICES}
    pixels = np.concatenate([calib[0]] + [held[d][0] for d in DEVICES])
    labels = np.concatenate([calib[1]] + [held[d][1] for d in DEVICES])
    deltas = [delta_format.load_file(run / d / f"delta-{r}.safetensors") for d in DEVICES]
    weights = capped_shares(np.array([float(x.samples_seen) for x in deltas]), MAX_SHARE)
    dense = [x.to_dense(k) for x in deltas]
    runner = create_runner(bundle, resolve_profile(None, bundle), batch=64)

    def score(step: np.ndarray, confusions: bool = False) -> dict[str, Any]:
        def embed(px: np.ndarray) -> np.ndarray:
            return embed_and_score(runner, bundle, px, step)[0]

        train = embed(pixels)
        n = len(calib[1])
        parts: list[Any] = [class_scatter(train[:n], labels[:n])]
        for d in DEVICES:
            size_d = len(held[d][1])
            parts.append(Scatter.of(train[n:n + size_d], labels[n:n + size_d], DEVICE_RANK))
            n += size_d
        classes = sorted(set(labels.tolist()))
        head = LdaHead(train.shape[1])
        head.scatter, head.count, head.groups = pooled(parts)
        means = np.stack([train[labels == c].mean(0) for c in classes])
        out: dict[str, Any] = {}
        hits = total = 0
        for group, (px, truth) in tests.items():
            predicted = np.asarray(classes)[head.logits(embed(px), means).argmax(1)]
            out[group] = 100.0 * float((predicted == truth).mean())
            hits, total = hits + int((predicted == truth).sum()), total + len(truth)
            if confusions:
                where: dict[str, int] = {}
                for p, t in zip(predicted[predicted != truth], truth[predicted != truth], strict=True):
                    side = ("same group" if owner.get(p) == owner.get(t) else
                            "calibration classes" if p not in owner else f"{owner[p]}'s classes")
                    where[side] = where.get(side, 0) + 1
                out.setdefault("errors_went_to", {})[group] = where
        out["overall"] = 100.0 * hits / total
        return out

    try:
        rows: dict[str, Any] = {"frozen": score(np.zeros(k, np.float32), confusions=True)}
        for d, vector in zip(DEVICES, dense, strict=True):
            rows[f"{d} alone"] = score(vector)
        for option in options:
            step = quantize_step(merge(option, dense, weights)).values()
            rows[option] = score(step, confusions=option == "ties")
            rows[option]["elements_moved"] = int(np.count_nonzero(step))
            print(f"{run.name} round {r} {option}: overall {rows[option]['overall']:.1f} (frozen {rows['frozen']['overall']:.1f})",
                  flush=True)
    finally:
        runner.release()
    return rows


def table(results: dict[str, dict[str, Any]], r: int, options: list[str]) -> list[str]:
    keys = [key for key in results if key.endswith(f"/round-{r}")]
    groups = [*DEVICES_GROUPS, "overall"]
    mean: Callable[[str, str], float] = lambda arm, g: float(np.mean([results[key][arm][g] for key in keys]))  # noqa: E731
    lines = [f"Round {r}, mean of {len(keys)} runs:", "",
             "| option | " + " | ".join(groups) + " | groups below frozen | overall - frozen | interference cost |",
             "|---|" + "---|" * (len(groups) + 3)]
    for arm in ["frozen", *[f"{d} alone" for d in DEVICES], *options]:
        below = sum(mean(arm, g) < mean("frozen", g) - 1e-9 for g in DEVICES_GROUPS)
        cost = "" if arm.endswith("alone") else \
            f"{np.mean([results[key][f'{d} alone'][d] - results[key][arm][d] for key in keys for d in DEVICES]):.1f}"
        lines.append(f"| {arm} | " + " | ".join(f"{mean(arm, g):.1f}" for g in groups)
                     + f" | {'' if arm.endswith('alone') else below} | {mean(arm, 'overall') - mean('frozen', 'overall'):+.1f} | {cost} |")
    lines += ["", f"Round {r}, where the wrong answers went (test images, summed over the runs):", "",
              "| backbone | group | wrong | same group | calibration classes | " + " | ".join(f"{d}'s classes" for d in DEVICES) + " |",
              "|---|---|---|---|---|" + "---|" * len(DEVICES)]
    for arm in ("frozen", "ties"):
        for g in DEVICES_GROUPS:
            went: dict[str, int] = {}
            for key in keys:
                for side, n in results[key][arm].get("errors_went_to", {}).get(g, {}).items():
                    went[side] = went.get(side, 0) + n
            cells = [went.get("same group", 0), went.get("calibration classes", 0),
                     *[went.get(f"{d}'s classes", 0) for d in DEVICES]]
            lines.append(f"| {arm} | {g} | {sum(cells)} | " + " | ".join(str(c) for c in cells) + " |")
    return lines


DEVICES_GROUPS = ["calibration", *DEVICES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="run.py seed folders (OUT/seed-N), mode 1")
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "b7_merge_options.json")
    args = ap.parse_args()
    for run in args.runs:
        summary = run.parent / "b7.json"          # run.py's record of the seeds in this OUT
        seeds = json.loads(summary.read_text())["seeds"] if summary.exists() else []
        for seed in seeds:
            if f"seed-{seed['seed']}" == run.name and any(row.get("released", {}).get("published") for row in seed["rounds"]):
                raise SystemExit(f"{run}: a round was published there; this analysis needs every round on v1")
    results = {f"{run.name}/round-{r}": score_round(run, r, args.options) for run in args.runs for r in args.rounds}
    lines: list[str] = []
    for r in args.rounds:
        lines += [*table(results, r, args.options), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [str(p) for p in args.runs], "options": args.options, "results": results},
                                   indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
