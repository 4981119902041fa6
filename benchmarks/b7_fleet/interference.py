"""B7, what interference costs each device (docs/benchmarks.md#b7), from a finished `run.py` round.

    .venv/bin/python benchmarks/b7_fleet/interference.py --run OUT/seed-1993 [--round 1] [--current DIR]

Every backbone of the round is scored the same way, so the rows compare like with like:
- frozen: the round's current version (v1 for round 1; ``--current`` for a later round);
- <device> alone: the current version + that device's own pushed delta (int4, as it was sent);
- fleet/<option>: the candidate each merge option built in the round (run.py's release-R-OPTION/candidate,
  or score-R-OPTION/candidate in mode 2, where e.g. ``ties+c3`` is the ties merge consolidated 3 epochs).
Under each backbone every class's mean is computed from all the round's training images of it (the
calibration images, every device's images: what a statistics round would sum exactly), and the
test images of every group are classified by the nearest mean (ncm, cosine: the release check's head).

Interference cost of an option for device d = (d alone) - (fleet/option) on d's classes: what the
merge takes away from d's own gain. Prints one markdown table; writes interference-R.json beside the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.b7_fleet.run import DEVICES  # noqa: E402


def _images(folders: list[Path], size: tuple[int, int], interpolation: str) -> tuple[np.ndarray, list[str]]:
    from edgecl.formats.images import load_image_folder

    pixels, labels = [], []
    for folder in folders:
        im = load_image_folder(folder, size, interpolation, progress=False)
        pixels.append(im.pixels)
        labels += [im.classes[i] for i in im.labels]
    return np.concatenate(pixels), labels


def score_backbone(bundle: Path, train: tuple[np.ndarray, list[str]], tests: dict[str, tuple[np.ndarray, list[str]]]
                   ) -> dict[str, float]:
    from edgecl.formats.prototypes import Prototypes
    from edgecl.formats.scoring import score
    from edgecl.release import _embed

    embedded = _embed(bundle, train[0])
    labels = np.asarray(train[1])
    classes = sorted(set(train[1]))
    table = Prototypes(classes, np.stack([embedded[labels == c].mean(0) for c in classes]).astype(np.float32),
                       np.array([int((labels == c).sum()) for c in classes], np.int64))
    out, hits, total = {}, 0.0, 0
    for group, (pixels, truth) in tests.items():
        s = score(_embed(bundle, pixels), truth, table)
        assert s is not None
        out[group] = 100.0 * s["accuracy"]
        hits, total = hits + s["accuracy"] * s["images"], total + s["images"]
    out["overall"] = 100.0 * hits / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a seed folder of run.py (OUT/seed-N)")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--current", type=Path, default=None, help="the round's current version (default: OUT/v1)")
    args = ap.parse_args()
    from edgecl.formats import delta as delta_format
    from edgecl.formats import manifest as mf
    from edgecl.formats.prototypes import Prototypes
    from edgecl.host.apply import apply_delta

    run, r = args.run, args.round
    current = args.current or run / "v1"
    m = mf.load_manifest(current)
    size = (int(m.input_size[0]), int(m.input_size[1]))
    train = _images([run / "data" / "calib", *[run / "data" / d / f"train-{r}" for d in DEVICES]], size, m.interpolation)
    tests = {g.name: _images([g], size, m.interpolation) for g in sorted((run / "data" / "test").iterdir())}
    backbones: dict[str, Path] = {"frozen": current}
    work = run / f"interference-{r}"
    for d in DEVICES:
        out = work / f"{d}-alone"
        if not (out / mf.MANIFEST).exists():
            shutil.rmtree(out, ignore_errors=True)
            apply_delta(current, delta_format.load_file(run / d / f"delta-{r}.safetensors"), out, progress=False,
                        classes=Prototypes.empty(m.embedding_dim))
        backbones[f"{d} alone"] = out
    # mode 1 builds each option's candidate under release-R-OPTION; mode 2 scores each under score-R-OPTION
    for prefix in (f"release-{r}-", f"score-{r}-"):
        for folder in sorted(run.glob(f"{prefix}*")):
            if (folder / "candidate" / mf.MANIFEST).exists():
                backbones.setdefault(f"fleet/{folder.name.removeprefix(prefix)}", folder / "candidate")
    rows = {name: score_backbone(path, train, tests) for name, path in backbones.items()}
    groups = [*tests, "overall"]
    lines = [f"| backbone (round {r}) | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    lines += [f"| {name} | " + " | ".join(f"{row[g]:.1f}" for g in groups) + " |" for name, row in rows.items()]
    fleet = [n for n in rows if n.startswith("fleet/")]
    cost: dict[str, dict[str, float]] = {n: {d: rows[f"{d} alone"][d] - rows[n][d] for d in DEVICES} for n in fleet}
    lines += ["", "interference cost, (device alone) - (fleet option) on the device's classes, points:", "",
              "| option | " + " | ".join(DEVICES) + " | mean |", "|---|" + "---|" * (len(DEVICES) + 1)]
    lines += [f"| {n} | " + " | ".join(f"{c[d]:.1f}" for d in DEVICES) + f" | {np.mean(list(c.values())):.1f} |"
              for n, c in cost.items()]
    result: dict[str, Any] = {"round": r, "rows": rows, "cost": cost}
    (run / f"interference-{r}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
