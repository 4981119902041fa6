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


LDA_SHRINKAGE = (0.03, 0.1, 0.3)      # the lda head's grid; chosen on val like the lr
RANPAC_RIDGE = (1e4, 1e5, 1e6)        # the ranpac head's grid (M = RANPAC_M)
RANPAC_M = 2000


LDC_ALPHA = (0.1, 1.0)                # ridge strength of the linear drift map (x N x mean variance)


class LinearDrift:
    """Experimental (issue 6): old-class statistics carried through an affine map old space -> new
    space, fitted by ridge regression (towards the identity) on the images embedded before and after a
    task (the task's images and the stored exemplars), as in Learnable Drift Compensation (Gomez-Villa
    et al., ECCV 2024). The device's own code (edgecl.device.heads: fit_linear_drift, LdaHead.move)
    moves the class means (mu <- [mu, 1] W) and the LDA scatter (S <- L^T S L)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.lda = None  # LdaHead whose means are keyed by class id

    @property
    def protos(self) -> dict[int, np.ndarray]:
        return self.lda.means if self.lda is not None else {}

    def fit_and_move(self, before: np.ndarray, after: np.ndarray) -> None:
        from edgecl.device.heads import fit_linear_drift
        self.lda.move(fit_linear_drift(before, after, ridge=self.alpha))

    def add(self, emb: np.ndarray, labels: np.ndarray) -> None:
        from edgecl.device.heads import LdaHead
        self.lda = self.lda or LdaHead(emb.shape[1])
        self.lda.add(emb, labels)
        self.lda.means.update(class_means(emb, labels))


class Heads:
    """Every head of one run, fed the same statistics: ncm (SimpleCIL cosine prototypes, the protocol's
    head), lda (the prototypes + a pooled within-class covariance), ranpac (random projection + ridge).
    Old classes' statistics are never recomputed from their images: the prototypes follow the run's
    old-class rule (none / sdc / exemplars), the covariance and the Gram matrix stay as they were
    accumulated when each task was seen."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.lda = self.ranpac = None
        self.ldc = [LinearDrift(a) for a in LDC_ALPHA] if "ldc" in names else []
        self.device_lda = None  # (LdaHead, class id -> mean): the edgecl device's own LDA head

    def add(self, emb: np.ndarray, labels: np.ndarray) -> None:
        from edgecl.device.heads import LdaHead, RanpacHead
        if "lda" in self.names:
            self.lda = self.lda or LdaHead(emb.shape[1])
            self.lda.add(emb, labels)
        if "ranpac" in self.names:
            self.ranpac = self.ranpac or RanpacHead(emb.shape[1], RANPAC_M)
            self.ranpac.add(emb, labels)
        for ldc in self.ldc:
            ldc.add(emb, labels)

    def predict(self, emb: np.ndarray, protos: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(sorted(protos))
        out = {"ncm": cosine_predict(emb, protos)}
        if self.lda is not None:
            means = np.stack([protos[c] for c in ids])
            for s in LDA_SHRINKAGE:
                self.lda.shrinkage = s
                out[f"lda:{s:g}"] = ids[self.lda.logits(emb, means).argmax(axis=1)]
        if self.ranpac is not None:
            for r in RANPAC_RIDGE:
                out[f"ranpac:{r:g}"] = ids[self.ranpac.logits(emb, list(ids), ridge=r).argmax(axis=1)]
        if self.device_lda is not None and "device-lda" in self.names:
            head, dev_means = self.device_lda
            means = np.stack([dev_means.get(c, protos[c]) for c in ids])
            for s in LDA_SHRINKAGE:
                head.shrinkage = s
                out[f"device-lda:{s:g}"] = ids[head.logits(emb, means).argmax(axis=1)]
        for ldc in self.ldc:
            out[f"ldc-ncm:{ldc.alpha:g}"] = cosine_predict(emb, ldc.protos)
            ldc.lda.shrinkage = 0.3
            means = np.stack([ldc.protos[c] for c in ids])
            out[f"ldc-lda:{ldc.alpha:g}"] = ids[ldc.lda.logits(emb, means).argmax(axis=1)]
            # the LDC-moved covariance with the run's own prototypes (e.g. moved by exemplar drift)
            run_means = np.stack([protos[c] for c in ids])
            out[f"ldcS-lda:{ldc.alpha:g}"] = ids[ldc.lda.logits(emb, run_means).argmax(axis=1)]
        return out


def evaluate(embed: Callable[[np.ndarray], np.ndarray], split: list[Split], upto: int, tasks: list[list[int]],
             protos: dict[int, np.ndarray], heads: Heads) -> dict[str, tuple[float, list[float]]]:
    """Per head: A_t over all seen classes' images, and accuracy per seen task (choices: all seen classes)."""
    seen = concat(split[:upto + 1])
    result = {}
    for head, pred in heads.predict(embed(seen.pixels), protos).items():
        correct = pred == seen.labels
        per_task = [100.0 * float(np.mean(correct[np.isin(seen.labels, tasks[j])])) for j in range(upto + 1)]
        result[head] = (100.0 * float(np.mean(correct)), per_task)
    return result


def digits_accuracy(embed: Callable[[np.ndarray], np.ndarray], stream: Stream) -> float:
    protos = class_means(embed(stream.digits_train.pixels), stream.digits_train.labels)
    pred = cosine_predict(embed(stream.digits_test.pixels), protos)
    return 100.0 * float(np.mean(pred == stream.digits_test.labels))


def run_stream(learner: Any, stream: Stream, name: str, drift: bool = False, exemplars: int = 0,
               replay: bool = False, old_update: str = "recompute", replay_share: float = 0.0, heads: tuple[str, ...] = ()) -> dict[str, Any]:
    """One pass over the 5 tasks. ``learner`` has adapt(pixels, labels, task) and embed(pixels).

    drift=True moves the old prototypes by the Semantic Drift Compensation estimate (edgecl.device.drift,
    issue 6) from the current task's embeddings before/after adaptation; off for the paper protocol.
    exemplars=N keeps N images per class, chosen by herding as the device does
    (edgecl.formats.exemplars). old_update says what they do to the old prototypes after each task:
    "recompute" (the mean of the exemplars' new embeddings) or "shift" (the prototype, computed once
    from all of the class's images, moved by how the exemplars' mean moved: the drift measured on the
    class itself). replay=True also mixes the stored exemplars into the adaptation data, so the
    contrastive loss separates the new classes from the old ones (issue 6). heads: extra heads scored
    on the same embeddings (lda, ranpac; see Heads); their numbers go to out["heads"].
    """
    t_start = time.perf_counter()
    digits_before = digits_accuracy(learner.embed, stream)
    protos: dict[int, np.ndarray] = {}
    memory: dict[int, np.ndarray] = {}  # class -> exemplar pixels
    head_stats = Heads(list(heads))
    out: dict[str, Any] = {"method": name, "A_val": [], "A_test": [], "acc_val": [], "acc_test": [],
                           "adapt": [], "heads": {}}
    for t, _classes in enumerate(stream.tasks):
        tr = stream.train[t]
        before = learner.embed(tr.pixels) if (drift and protos) else None
        mem_before = ({c: learner.embed(px).mean(axis=0) for c, px in memory.items()}
                      if old_update == "shift" else {})
        fit_px = np.concatenate([tr.pixels, *memory.values()])
        fit_before = learner.embed(fit_px) if (head_stats.ldc and protos) else None
        px, lb = tr.pixels, tr.labels
        if replay and memory:
            from edgecl.device.adapt import replay_repeats
            k = replay_repeats(len(px), sum(len(v) for v in memory.values()), replay_share)
            px = np.concatenate([px, *[v for v in memory.values() for _ in range(k)]])
            lb = np.concatenate([lb, *[np.full(len(v), c, lb.dtype) for c, v in memory.items() for _ in range(k)]])
        log = learner.adapt(px, lb, t)
        emb = learner.embed(tr.pixels)
        if before is not None:
            from edgecl.device.drift import compensate, default_sigma
            old = sorted(protos)
            moved = compensate(np.stack([protos[c] for c in old]), before, emb, default_sigma(before, tr.labels))
            protos.update({c: moved[i] for i, c in enumerate(old)})
        if exemplars and memory:
            now = {c: learner.embed(px).mean(axis=0) for c, px in memory.items()}
            if old_update == "shift":
                protos.update({c: protos[c] + now[c] - mem_before[c] for c in memory})
            else:
                protos.update(now)
        protos.update(class_means(emb, tr.labels))  # SimpleCIL: add the new classes' prototypes
        device_protos = getattr(learner, "prototypes", lambda: None)()
        if device_protos is not None:  # the edgecl path keeping old classes: score the device's own
            protos = {c: device_protos[c] for c in protos}
        if fit_before is not None:
            fit_after = learner.embed(fit_px)
            for ldc in head_stats.ldc:
                ldc.fit_and_move(fit_before, fit_after)
        head_stats.add(emb, tr.labels)
        head_stats.device_lda = getattr(learner, "lda_head", lambda: None)()
        if exemplars:
            from edgecl.formats.exemplars import herding_order
            for c in np.unique(tr.labels):
                rows = np.flatnonzero(tr.labels == c)
                memory[int(c)] = tr.pixels[rows[herding_order(emb[rows], exemplars)]]
        for split in ("val", "test"):
            for head, (a, per_task) in evaluate(learner.embed, getattr(stream, split), t, stream.tasks, protos,
                                                head_stats).items():
                h = out if head == "ncm" else out["heads"].setdefault(head, {})
                h.setdefault(f"A_{split}", []).append(a)
                h.setdefault(f"acc_{split}", []).append(per_task)
        out["adapt"].append({k: v for k, v in vars(log).items() if k != "changed_fraction"}
                            | {"changed_fraction_mean": float(np.mean(log.changed_fraction))
                               if getattr(log, "changed_fraction", None) else None})
        print(f"  [{name}] task {t + 1}: A_val {out['A_val'][-1]:.1f}  A_test {out['A_test'][-1]:.1f}  "
              f"steps {log.steps}  adapt {log.seconds:.0f}s  losses {[round(x, 3) for x in log.losses]}",
              flush=True)
    digits_after = digits_accuracy(learner.embed, stream)
    for h in [out, *out["heads"].values()]:
        for split in ("val", "test"):
            h[f"last_{split}"] = h[f"A_{split}"][-1]
            h[f"mean_A_{split}"] = float(np.mean(h[f"A_{split}"]))
            h[f"forgetting_{split}"] = stream_metrics(h[f"acc_{split}"])["forgetting"]
    for head, h in out["heads"].items():
        print(f"  [{name}] head {head}: last {h['last_test']:.1f}  mean A_t {h['mean_A_test']:.1f}  "
              f"forgetting {h['forgetting_test']:.1f}  (val mean A_t {h['mean_A_val']:.1f})", flush=True)
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
    ap.add_argument("--replay", action="store_true",
                    help="also run MIST (torch) with the exemplars mixed into each task's adaptation data")
    ap.add_argument("--replay-share", type=float, default=0.0,
                    help="with --replay: repeat the exemplars so they are about this share of the data (0 = once)")
    ap.add_argument("--old-update", default="recompute", choices=["recompute", "shift"],
                    help="what exemplars do to old prototypes: recompute from them, or shift by their drift")
    ap.add_argument("--heads", default="", help="extra heads scored in every run: lda, ranpac (comma list)")
    ap.add_argument("--variants", default="",
                    help="which MIST (torch) rows: comma list of mist, sdc, ex, replay (ex + replay); "
                         "default: mist plus what --drift / --exemplars / --replay ask for")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    args = ap.parse_args()

    from torch_methods import TorchLearner, TrainConfig

    from edgecl.formats.config import load_recipe

    methods = args.methods.split(",")
    heads = tuple(h for h in args.heads.split(",") if h)
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
    variants: list[tuple[str, str, float | None, dict[str, Any]]] = []  # (label, method, lr, run_stream kwargs)
    ex = {"exemplars": args.exemplars, "old_update": args.old_update, "replay_share": args.replay_share}
    wanted = set(args.variants.split(",")) if args.variants else (
        {"mist"} | ({"sdc"} if args.drift else set()) | ({"ex"} if args.exemplars else set())
        | ({"replay"} if args.exemplars and args.replay else set()))
    if wanted & {"ex", "replay"} and not args.exemplars:
        ap.error("the ex and replay variants need --exemplars N")
    for m in methods:
        if m == "frozen":
            variants.append(("frozen", "frozen", None, {}))
        elif m == "full_ft":
            variants += [(m, m, lr, {}) for lr in lrs]
        elif m == "mist":
            for name, label, kwargs in (("mist", "mist", {}), ("sdc", "mist+sdc", {"drift": True}),
                                        ("ex", "mist+ex", ex), ("replay", "mist+ex+replay", ex | {"replay": True})):
                if name in wanted:
                    variants += [(label, m, lr, kwargs) for lr in lrs]
    for label, method, lr, kwargs in variants:
        for seed in seeds:
            cfg = dataclasses.replace(base_cfg, lr=lr or 0.0, seed=seed,
                                      momentum=args.momentum if method == "full_ft" else 0.0)
            print(f"== {label} lr={lr} seed={seed}", flush=True)
            learner = TorchLearner(recipe, method, cfg, threads=args.threads)
            run = run_stream(learner, stream, label, heads=heads, **kwargs) | {"lr": lr, "seed": seed, "label": label}
            results["runs"].append(run)
            common.write_json(f"b1_accuracy{args.tag}.json", results)

    for method in [m for m in ("edgecl", "edgecl_keep") if m in methods]:
        # edgecl: the paper protocol through the real path; edgecl_keep: the device keeps old classes
        # right itself (exemplars, replay, drift; issue 6). lr: --edgecl-lrs, else torch's choice.
        from b4_export import recipe_for_size
        from edgecl_path import EdgeclLearner
        keep = method == "edgecl_keep"
        label = "edgecl+ex+replay" if keep else "edgecl"
        mist_choice = _choose([r for r in results["runs"] if r["label"] == ("mist+ex+replay" if keep else "mist")])
        edge_lrs = [float(x) for x in args.edgecl_lrs.split(",")] if args.edgecl_lrs else (
            [mist_choice] if mist_choice is not None else lrs)
        for lr in edge_lrs:
            for seed in seeds:
                print(f"== {label} lr={lr} seed={seed}", flush=True)
                learner = EdgeclLearner(recipe, dataclasses.replace(base_cfg, lr=lr, seed=seed), threads=args.threads,
                                        task_dirs=stream.task_dirs, recipe_path=recipe_for_size(args.size),
                                        keep_old=keep, replay_share=args.replay_share)
                run = run_stream(learner, stream, label, heads=heads) | {"lr": lr, "seed": seed, "label": label,
                                                                         "device": learner.device_summary()}
                results["runs"].append(run)
                common.write_json(f"b1_accuracy{args.tag}.json", results)

    finalize(results, heads, args.size, seeds, args.tag)
    print(f"wrote {common.OUT / f'b1_accuracy{args.tag}.json'} and .png; total {time.perf_counter() - t0:.0f}s")


def finalize(results: dict[str, Any], heads: tuple[str, ...], size: int, seeds: list[int], tag: str) -> None:
    """Choose every method's lr (and each head's parameter) on val, print the tables, write JSON + PNG."""
    results["selection"], results["chosen"] = {}, {}
    for label in dict.fromkeys(r["label"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["label"] == label]
        lr = _choose(runs)
        results["selection"][label] = {"grid": sorted({r["lr"] for r in runs}, key=lambda v: v or 0), "chosen": lr,
                                       "val_mean_A": {str(r["lr"]): r["mean_A_val"] for r in runs}}
        results["chosen"][label] = summarize([r for r in runs if r["lr"] == lr]) | {"lr": lr}
        for family in heads:  # each head's (lr, parameter) chosen on val mean A_t, like the lr alone
            keys = sorted({k for r in runs for k in r["heads"] if k.split(":")[0] == family})
            cands = [(r_lr, k) for r_lr in sorted({r["lr"] for r in runs}, key=lambda v: v or 0) for k in keys]
            if not cands:
                continue
            best = max(cands, key=lambda c: round(float(np.mean(
                [r["heads"][c[1]]["mean_A_val"] for r in runs if r["lr"] == c[0]])), 6))
            chosen = [r["heads"][best[1]] | {"seed": r["seed"], "digits_before": r["digits_before"],
                                             "digits_after": r["digits_after"]}
                      for r in runs if r["lr"] == best[0]]
            results["chosen"][f"{label} [{family}]"] = summarize(chosen) | {"lr": best[0], "head": best[1]}

    print(f"\nB1 - test accuracy (%), {size} px, seeds {seeds}; lr chosen on val mean A_t")
    rows = []
    for r in results["runs"]:
        a = r["A_test"]
        rows.append([r["label"], r["lr"] if r["lr"] is not None else "-", r["seed"], *[round(x, 1) for x in a],
                     round(r["mean_A_test"], 1), round(r["forgetting_test"], 1), round(r["mean_A_val"], 1),
                     f"{r['digits_before']:.1f} -> {r['digits_after']:.1f}", round(r["seconds"])])
    results["table"] = common.print_table(
        ["method", "lr", "seed", "A_1", "A_2", "A_3", "A_4", "A_5=last", "mean A_t", "forgetting", "val mean A_t",
         "digits before->after", "s"], rows)
    print(f"\nchosen on val (mean +- std over seeds {seeds}), test %")
    results["chosen_table"] = common.print_table(
        ["method [head]", "lr", "head param", "last A_5", "mean A_t", "forgetting", "digits before->after"],
        [[label, c["lr"] if c["lr"] is not None else "-", c.get("head", "ncm"),
          f"{c['last_test']:.1f} +- {c['last_test_std']:.1f}", f"{c['mean_A_test']:.1f} +- {c['mean_A_test_std']:.1f}",
          f"{c['forgetting_test']:.1f} +- {c['forgetting_test_std']:.1f}",
          f"{c['digits_before']:.1f} -> {c['digits_after']:.1f} +- {c['digits_after_std']:.1f}"]
         for label, c in results["chosen"].items()])
    common.write_json(f"b1_accuracy{tag}.json", results)
    plot(results, str(common.OUT / f"b1_accuracy{tag}.png"))


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
