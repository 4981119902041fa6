"""B9 unknown detection + the ECE of calibrated probabilities (issues 23 and 24; docs/benchmarks.md#b9).

A bundle that knows Fashion-MNIST 0-4 (real EfficientNet-Lite0 at 64 px, `edgecl export` on 300 train
images per class). Its LDA statistics are what `edgecl adapt --epochs 0` makes from the same images
(the pooled within-class scatter, the class means); ``edgecl.device.unknown.calibrate`` then fits the
threshold (5% false-unknown target) and the temperatures on 100 held-out images per class (val split,
disjoint from train). Scored on test images: 0-4 known, 5-9 near unknown, scikit-learn's 8x8 digits
far unknown. Everything after the export runs the device's code (onnxruntime + numpy).

    .venv/bin/python benchmarks/b8_b9_floor/b9_unknown.py [--per-class 300] [--threads 2]

Writes benchmarks/out/floor/b9_unknown.json (and the ECE part again as ece_calibration.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.b1_b6_accuracy.digits import write_digits_proxy  # noqa: E402
from benchmarks.shared.common import OUT, RECIPE, machine, print_table, write_json  # noqa: E402
from edgecl.datasets import SEED, write_fashion_groups  # noqa: E402
from edgecl.formats.config import DeviceProfile  # noqa: E402
from edgecl.formats.images import load_image_folder  # noqa: E402

KNOWN, NOVEL = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=300, help="train images per known class")
    ap.add_argument("--held-out", type=int, default=100, help="held-out (calibration) images per known class")
    ap.add_argument("--test", type=int, default=200, help="test images per class")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.05, help="target false-unknown rate")
    ap.add_argument("--bundle", type=Path, default=None, help="reuse this bundle (exported on the known train set)")
    args = ap.parse_args()
    work = OUT / "floor"
    data = write_fashion_groups(work / f"fm-{args.per_class}-{args.held_out}-{args.test}",
                                {"known": KNOWN, "novel": NOVEL}, train_per_class=args.per_class,
                                val_per_class=args.held_out, test_per_class=args.test, seed=SEED)
    digits = write_digits_proxy(work / "digits", seed=SEED)
    bundle_dir = args.bundle or work / "bundle-known"
    t0 = time.perf_counter()
    if args.bundle is None and not (bundle_dir / "manifest.json").exists():
        from edgecl.host.export import ExportOptions, export_bundle
        export_bundle(RECIPE, data / "known" / "train", bundle_dir, options=ExportOptions(progress=False))
    export_s = time.perf_counter() - t0

    # -- the device from here on -------------------------------------------------------------------
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import create_runner, embed_and_score
    from edgecl.device.state import load_current, open_bundle
    from edgecl.device.unknown import MahalanobisScorer, calibrate
    from edgecl.formats.calibration import (
        NCM_TEMPERATURE,
        auroc,
        cosine_scores,
        expected_calibration_error,
        softmax,
    )

    bundle = open_bundle(bundle_dir)
    state = load_current(bundle)
    classes = state.prototypes.classes
    m = bundle.manifest
    runner = create_runner(bundle, DeviceProfile(name="bench", threads=args.threads))

    def embed(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        d = load_image_folder(folder, m.input_size, m.interpolation, progress=False)
        e, _ = embed_and_score(runner, bundle, d.pixels, state.delta, state.prototypes.means)
        return e.astype(np.float64), d.labels, d.classes

    t1 = time.perf_counter()
    train, train_y, train_c = embed(data / "known" / "train")
    held, held_y, held_c = embed(data / "known" / "val")
    test_k, test_y, test_c = embed(data / "known" / "test")
    near, _, _ = embed(data / "novel" / "test")
    far, _, _ = embed(digits / "test")
    embed_s = time.perf_counter() - t1
    assert train_c == held_c == test_c == classes, (train_c, classes)

    lda = LdaHead(train.shape[1])
    lda.add(train, train_y)            # what adapt --epochs 0 accumulates
    means = np.stack([train[train_y == i].mean(0) for i in range(len(classes))])
    protos = state.prototypes.means.astype(np.float64)
    record = calibrate(held, held_y, protos, lda, means, false_unknown_rate=args.rate)

    scorer = MahalanobisScorer.create(lda, means)
    def scores(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"relative_mahalanobis": scorer.unknown_scores(x),
                "mahalanobis": scorer.distances(x).min(axis=1),
                "ncm_max_probability": -softmax(cosine_scores(x, protos), NCM_TEMPERATURE).max(axis=1),
                "lda_max_probability": -softmax(lda.logits(x, means), record["temperature"]["lda"]).max(axis=1)}
    s_known, s_near, s_far = scores(test_k), scores(near), scores(far)
    rows, table = [], {}
    for name in s_known:
        both = np.concatenate([s_near[name], s_far[name]])
        table[name] = {"auroc_near": auroc(s_known[name], s_near[name]), "auroc_far": auroc(s_known[name], s_far[name]),
                       "auroc_all": auroc(s_known[name], both)}
        rows.append([name, 100 * table[name]["auroc_near"], 100 * table[name]["auroc_far"], 100 * table[name]["auroc_all"]])
    print_table(["unknown score", "AUROC near (5-9)", "AUROC far (digits)", "AUROC near+far"], rows)
    u = s_known["relative_mahalanobis"]
    flagged = {"known_test": float(np.mean(u > record["threshold"])),
               "near": float(np.mean(s_near["relative_mahalanobis"] > record["threshold"])),
               "far": float(np.mean(s_far["relative_mahalanobis"] > record["threshold"])),
               "target": args.rate}
    print(f"flagged at the calibrated threshold: known {100 * flagged['known_test']:.1f}% (target "
          f"{100 * args.rate:.0f}%), near {100 * flagged['near']:.1f}%, far {100 * flagged['far']:.1f}%")

    ece = {}
    for head, raw, before_t in (("lda", lda.logits(test_k, means), 1.0),
                                ("ncm", cosine_scores(test_k, protos), NCM_TEMPERATURE)):
        t = record["temperature"][head]
        ece[head] = {"temperature": t, "uncalibrated_temperature": before_t,
                     "accuracy": float(np.mean(raw.argmax(1) == test_y)),
                     "ece_before": expected_calibration_error(softmax(raw, before_t), test_y),
                     "ece_after": expected_calibration_error(softmax(raw, t), test_y)}
    print_table(["head", "T", "accuracy", "ECE before", "ECE after"],
                [[h, e["temperature"], 100 * e["accuracy"], e["ece_before"], e["ece_after"]] for h, e in ece.items()])
    best_baseline = max(table["ncm_max_probability"]["auroc_all"], table["mahalanobis"]["auroc_all"])
    goals = {"auroc_all>=0.90": table["relative_mahalanobis"]["auroc_all"] >= 0.90,
             "auroc_all>=ncm_max_prob+0.05": table["relative_mahalanobis"]["auroc_all"]
             >= table["ncm_max_probability"]["auroc_all"] + 0.05,
             "flagged_within_2_points": abs(flagged["known_test"] - args.rate) <= 0.02,
             "lda_ece_after<=0.05": ece["lda"]["ece_after"] <= 0.05}
    result = {"benchmark": "B9", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "images": {"train_per_class": args.per_class, "held_out_per_class": args.held_out,
                         "known_test": len(test_k), "near_test": len(near), "far_test": len(far)},
              "calibration": record, "auroc": table, "flagged": flagged, "ece": ece, "goals": goals,
              "best_baseline_auroc_all": best_baseline, "export_s": export_s, "embed_s": embed_s}
    print("goals:", goals)
    print("wrote", write_json("floor/b9_unknown.json", result))
    write_json("floor/ece_calibration.json", {"benchmark": "ECE (issue 24)", "machine": result["machine"],
                                              "held_out_per_class": args.held_out, "test_images": len(test_k),
                                              "ece": ece, "goal": "lda ece_after <= 0.05",
                                              "met": goals["lda_ece_after<=0.05"]})


if __name__ == "__main__":
    main()
