"""B1: continual-learning accuracy on a real pre-trained model (BENCHMARKS.md B1).

ImageNet-pretrained EfficientNet-Lite0 (BN folded), Fashion-MNIST 5 tasks x 2 classes (order 0..9),
300 train / 100 val / 200 test images per class (seed 1993), SimpleCIL cosine prototypes for every
method, old prototypes never recomputed. Methods side by side:

- ``frozen``   : SimpleCIL on the untouched backbone;
- ``full_ft``  : every weight trained with SGD on the SupCon loss (torch);
- ``mist``     : MIST in torch (the reference): MI-Fisher mask per task + drop-gated truly sparse SGD;
- ``edgecl``   : the real path: `edgecl export` (host, torch) -> `edgecl adapt` (a device process:
                 onnxruntime, no torch) -> delta -> `edgecl apply` -> next task; embeddings from the
                 bundle's inference graph in onnxruntime.

Hyper-parameters: for every trained method the same grid of backbone learning rates is run; the
one with the best mean incremental accuracy on the *validation* images is chosen, and its *test*
numbers are reported (val and test are evaluated in the same run, training sees neither).
Retention: prototype accuracy on scikit-learn's digits (never trained on), before vs after.

Run: .venv/bin/python benchmarks/b1_accuracy.py [--size 64] [--lrs 1e-3,1e-2] [--seeds 1993] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import common  # benchmarks/ is the script folder; it puts the repo on sys.path
import numpy as np
from common import Split, Stream, class_means, concat, cosine_predict, stream_metrics

TRAINED = ("full_ft", "mist", "edgecl")


def evaluate(embed: Callable[[np.ndarray], np.ndarray], split: list[Split], upto: int, tasks: list[list[int]],
             protos: dict[int, np.ndarray]) -> tuple[float, list[float]]:
    """A_t over all seen classes' images, and accuracy per seen task (choices: all seen classes)."""
    seen = concat(split[:upto + 1])
    pred = cosine_predict(embed(seen.pixels), protos)
    correct = pred == seen.labels
    per_task = [100.0 * float(np.mean(correct[np.isin(seen.labels, tasks[j])])) for j in range(upto + 1)]
    return 100.0 * float(np.mean(correct)), per_task


def digits_accuracy(embed: Callable[[np.ndarray], np.ndarray], stream: Stream) -> float:
    protos = class_means(embed(stream.digits_train.pixels), stream.digits_train.labels)
    pred = cosine_predict(embed(stream.digits_test.pixels), protos)
    return 100.0 * float(np.mean(pred == stream.digits_test.labels))


def run_stream(learner: Any, stream: Stream, name: str, drift: bool = False, exemplars: int = 0) -> dict[str, Any]:
    """One pass over the 5 tasks. ``learner`` has adapt(pixels, labels, task) and embed(pixels).

    drift=True moves the old prototypes by the Semantic Drift Compensation estimate (edgecl.device.drift,
    issue 6) from the current task's embeddings before/after adaptation; off for the paper protocol.
    exemplars=N keeps N images per class, chosen by herding as the device does
    (edgecl.formats.exemplars), and recomputes the old classes' prototypes from them after each task.
    """
    t_start = time.perf_counter()
    digits_before = digits_accuracy(learner.embed, stream)
    protos: dict[int, np.ndarray] = {}
    memory: dict[int, np.ndarray] = {}  # class -> exemplar pixels
    out: dict[str, Any] = {"method": name, "A_val": [], "A_test": [], "acc_val": [], "acc_test": [],
                           "adapt": []}
    for t, _classes in enumerate(stream.tasks):
        tr = stream.train[t]
        before = learner.embed(tr.pixels) if (drift and protos) else None
        log = learner.adapt(tr.pixels, tr.labels, t)
        emb = learner.embed(tr.pixels)
        if before is not None:
            from edgecl.device.drift import compensate, default_sigma
            old = sorted(protos)
            moved = compensate(np.stack([protos[c] for c in old]), before, emb, default_sigma(before, tr.labels))
            protos.update({c: moved[i] for i, c in enumerate(old)})
        if exemplars and memory:
            protos.update({c: learner.embed(px).mean(axis=0) for c, px in memory.items()})
        protos.update(class_means(emb, tr.labels))  # SimpleCIL: add the new classes' prototypes
        if exemplars:
            from edgecl.formats.exemplars import herding_order
            for c in np.unique(tr.labels):
                rows = np.flatnonzero(tr.labels == c)
                memory[int(c)] = tr.pixels[rows[herding_order(emb[rows], exemplars)]]
        for split in ("val", "test"):
            a, per_task = evaluate(learner.embed, getattr(stream, split), t, stream.tasks, protos)
            out[f"A_{split}"].append(a)
            out[f"acc_{split}"].append(per_task)
        out["adapt"].append({k: v for k, v in vars(log).items() if k != "changed_fraction"}
                            | {"changed_fraction_mean": float(np.mean(log.changed_fraction))
                               if getattr(log, "changed_fraction", None) else None})
        print(f"  [{name}] task {t + 1}: A_val {out['A_val'][-1]:.1f}  A_test {out['A_test'][-1]:.1f}  "
              f"steps {log.steps}  adapt {log.seconds:.0f}s  losses {[round(x, 3) for x in log.losses]}",
              flush=True)
    digits_after = digits_accuracy(learner.embed, stream)
    for split in ("val", "test"):
        out[f"last_{split}"] = out[f"A_{split}"][-1]
        out[f"mean_A_{split}"] = float(np.mean(out[f"A_{split}"]))
        out[f"forgetting_{split}"] = stream_metrics(out[f"acc_{split}"])["forgetting"]
    out["digits_before"], out["digits_after"] = digits_before, digits_after
    out["seconds"] = time.perf_counter() - t_start
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (population std; 0 for one seed) over seeds of the test metrics."""
    keys = ["last_test", "mean_A_test", "forgetting_test", "digits_before", "digits_after", "mean_A_val"]
    s: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs]
        s[k] = float(np.mean(vals))
        s[k + "_std"] = float(statistics.pstdev(vals)) if len(vals) > 1 else 0.0
    s["A_test"] = np.mean([r["A_test"] for r in runs], axis=0).tolist()
    s["seeds"] = [r["seed"] for r in runs]
    return s


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, s in results["chosen"].items():
        ax1.plot(range(1, len(s["A_test"]) + 1), s["A_test"], marker="o", label=label)
    ax1.set_xlabel("task")
    ax1.set_ylabel("A_t, test (%)")
    ax1.set_title(f"B1 Fashion-MNIST 5x2, EfficientNet-Lite0 {results['config']['size']} px")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    labels = list(results["chosen"])
    x = np.arange(len(labels))
    ax2.bar(x - 0.2, [results["chosen"][m]["last_test"] for m in labels], 0.4, label="last A_5")
    ax2.bar(x + 0.2, [results["chosen"][m]["forgetting_test"] for m in labels], 0.4, label="forgetting")
    ax2.set_xticks(x, labels, rotation=20, fontsize=8)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="input size in px (square)")
    ap.add_argument("--methods", default="frozen,full_ft,mist,edgecl")
    ap.add_argument("--lrs", default="1e-3,1e-2", help="backbone lr grid, chosen on val per method")
    ap.add_argument("--edgecl-lrs", default="", help="lr grid of the edgecl path; default: torch MIST's choice")
    ap.add_argument("--seeds", default="1993")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--select-rate", type=float, default=0.05)
    ap.add_argument("--drop-rate", type=float, default=0.9)
    ap.add_argument("--small-tensors", default="full", choices=["full", "ranked"],
                    help="torch MIST mask: 1-D tensors fully trainable (reference) or ranked by score")
    ap.add_argument("--momentum", type=float, default=0.0, help="full FT momentum (MIST never has any)")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drift", action="store_true", help="also run MIST (torch) with drift compensation")
    ap.add_argument("--exemplars", type=int, default=0,
                    help="also run MIST (torch) with N exemplars per class refreshing old prototypes (issue 6)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    args = ap.parse_args()

    from torch_methods import TorchLearner, TrainConfig

    from edgecl.formats.config import load_recipe

    methods = args.methods.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    recipe = load_recipe(common.RECIPE)
    recipe.input_size = [args.size, args.size]
    t0 = time.perf_counter()
    fashion, digits = common.prepare_data(args.train_per_class, args.val_per_class, args.test_per_class)
    stream = common.load_stream(fashion, digits, recipe.input_size, recipe.interpolation)
    print(f"data: {fashion} ({sum(len(s.labels) for s in stream.train)} train images) "
          f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)

    base_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, select_rate=args.select_rate,
                           drop_rate=args.drop_rate, small_tensors=args.small_tensors)
    results: dict[str, Any] = {"machine": common.machine(), "config": vars(args) | {"recipe": recipe.name},
                               "runs": [], "chosen": {}, "selection": {}}
    variants: list[tuple[str, str, float | None, bool, int]] = []  # (label, method, lr, drift, exemplars)
    for m in methods:
        if m == "frozen":
            variants.append(("frozen", "frozen", None, False, 0))
        elif m in ("full_ft", "mist"):
            variants += [(m, m, lr, False, 0) for lr in lrs]
            if m == "mist" and args.drift:
                variants += [("mist+sdc", m, lr, True, 0) for lr in lrs]
            if m == "mist" and args.exemplars:
                variants += [("mist+ex", m, lr, False, args.exemplars) for lr in lrs]
    for label, method, lr, drift, n_exemplars in variants:
        for seed in seeds:
            cfg = dataclasses.replace(base_cfg, lr=lr or 0.0, seed=seed,
                               momentum=args.momentum if method == "full_ft" else 0.0)
            print(f"== {label} lr={lr} seed={seed}", flush=True)
            learner = TorchLearner(recipe, method, cfg, threads=args.threads)
            run = run_stream(learner, stream, label, drift=drift, exemplars=n_exemplars) | {
                "lr": lr, "seed": seed, "label": label}
            results["runs"].append(run)
            common.write_json(f"b1_accuracy{args.tag}.json", results)

    if "edgecl" in methods:
        from b4_export import recipe_for_size
        from edgecl_path import EdgeclLearner
        mist_choice = _choose([r for r in results["runs"] if r["label"] == "mist"])
        edge_lrs = [float(x) for x in args.edgecl_lrs.split(",")] if args.edgecl_lrs else (
            [mist_choice] if mist_choice is not None else lrs)
        for lr in edge_lrs:
            for seed in seeds:
                print(f"== edgecl lr={lr} seed={seed}", flush=True)
                learner = EdgeclLearner(recipe, dataclasses.replace(base_cfg, lr=lr, seed=seed), threads=args.threads,
                                        task_dirs=stream.task_dirs, recipe_path=recipe_for_size(args.size))
                run = run_stream(learner, stream, "edgecl") | {"lr": lr, "seed": seed, "label": "edgecl",
                                                               "device": learner.device_summary()}
                results["runs"].append(run)
                common.write_json(f"b1_accuracy{args.tag}.json", results)

    for label in dict.fromkeys(r["label"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["label"] == label]
        lr = _choose(runs)
        results["selection"][label] = {"grid": sorted({r["lr"] for r in runs}, key=lambda v: v or 0), "chosen": lr,
                                       "val_mean_A": {str(r["lr"]): r["mean_A_val"] for r in runs}}
        results["chosen"][label] = summarize([r for r in runs if r["lr"] == lr]) | {"lr": lr}

    print(f"\nB1 - test accuracy (%), {args.size} px, seeds {seeds}; lr chosen on val mean A_t")
    rows = []
    for r in results["runs"]:
        a = r["A_test"]
        rows.append([r["label"], r["lr"] if r["lr"] is not None else "-", r["seed"], *[round(x, 1) for x in a],
                     round(r["mean_A_test"], 1), round(r["forgetting_test"], 1), round(r["mean_A_val"], 1),
                     f"{r['digits_before']:.1f} -> {r['digits_after']:.1f}", round(r["seconds"])])
    results["table"] = common.print_table(
        ["method", "lr", "seed", "A_1", "A_2", "A_3", "A_4", "A_5=last", "mean A_t", "forgetting", "val mean A_t",
         "digits before->after", "s"], rows)
    common.write_json(f"b1_accuracy{args.tag}.json", results)
    plot(results, str(common.OUT / f"b1_accuracy{args.tag}.png"))
    print(f"wrote {common.OUT / f'b1_accuracy{args.tag}.json'} and .png; total {time.perf_counter() - t0:.0f}s")


def _choose(runs: list[dict[str, Any]]) -> float | None:
    """The lr with the best validation mean A_t (averaged over seeds); ties go to the smaller lr."""
    if not runs:
        return None
    by_lr: dict[Any, list[float]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["mean_A_val"])
    return max(sorted(by_lr, key=lambda v: v or 0), key=lambda lr: round(float(np.mean(by_lr[lr])), 6))


if __name__ == "__main__":
    main()
