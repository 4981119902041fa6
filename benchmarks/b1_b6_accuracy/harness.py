"""One harness for B1 (class-incremental) and B6 (domain-incremental): a learner protocol, the heads,
the stream loop and the metrics. Every method (frozen, full fine-tuning, MIST in torch, the real edgecl
path) is a ``Learner``; the heads and the old-class rules around it are the device's own (post-steps,
edgecl/device/poststeps.py), imported from ``edgecl``: LdaHead (add, move, logits), replay_repeats,
herding_order, and every rule that merges or moves class statistics from ``edgecl.classstats``
(merge_by_counts, shift_by_exemplars, compensate_drift / default_sigma, fit_linear_drift), never
re-coded here. The stream loop skips what the benchmark streams never need: the device's merge first
takes out images the mean already counts (their fingerprints), and no image is shown twice here. The
edgecl learner keeps its own heads (``heads()``), so its rows use the device's code itself.

Per task t, in the device's order (edgecl.device.adapt, post-steps):
1. embed the task's images (and the stored exemplars) with the backbone before adapting;
2. ``learner.adapt``: the task's images plus replayed exemplars of old classes (repeated to the replay
   share), and the head's current class prototypes (the targets of the optional prototype loss term);
3. embed again; every class with stored exemplars moves by their drift (``shift``), the others by
   semantic drift compensation (``sdc``), or nothing moves (``none``);
4. the ``lda-map`` head's statistics and own class means are carried through the affine drift map
   fitted on (before, after) of the task's images and old classes' exemplars (``ncm-map``: cosine to
   those carried means); the ``lda`` head's are not (its means are the ncm prototypes);
5. the task's classes: prototypes (and lda-map means) merged with the new images' mean by counts, so a
   class seen again under a new camera keeps its old cameras (B6); covariance and Gram matrices get
   the new images; exemplars of the task's classes re-chosen by herding.
A learner that keeps its own heads (the edgecl device) returns them from ``heads()``; they replace
the harness's ncm prototypes and lda-map head.

Metrics: acc[t][j] = accuracy on group j (B1: task j's classes; B6: domain j's images, all classes)
after task t, choices = every class with a prototype. A_t pools the groups seen so far; last = A_T;
mean = average of A_t; forgetting = mean over j < T of max_{j<=t<T} acc[t][j] - acc[T][j]. B6 also
scores the domains not seen yet (how far the next camera is).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks.b1_b6_accuracy.ranpac import RanpacHead
from benchmarks.b1_b6_accuracy.streams import Stream, Task, concat
from edgecl import classstats
from edgecl.device.heads import LdaHead

LDA_SHRINKAGE = (0.03, 0.1, 0.3, 0.6)   # the lda heads' grid, chosen on val like the lr
RANPAC_RIDGE = (1e4, 1e5, 1e6, 1e7)      # the ranpac head's grid (small subsets pick the large ridges)
RANPAC_M = 2000
FAMILIES = ("ncm", "ncm-map", "lda", "lda-map", "ranpac")


# -- the learner protocol --------------------------------------------------------------------------
@dataclass
class AdaptInput:
    index: int                        # task index in the stream
    task: Task                        # its images and image folder (the CLI path reads the folder)
    pixels: np.ndarray                # training images: the task's plus replayed exemplars
    labels: np.ndarray                # global class ids
    targets: dict[int, np.ndarray]    # class -> the head's prototype now (task classes new to it: their mean)


@dataclass
class AdaptLog:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)            # mean loss per epoch
    changed_fraction: list[float] = field(default_factory=list)  # per step: changed weights / all weights


@dataclass
class OwnHeads:
    """Head statistics a learner keeps itself (the device state), by global class id."""
    prototypes: dict[int, np.ndarray]
    lda: Any | None = None            # edgecl.device.heads.LdaHead, means keyed by class id


class Learner(Protocol):
    name: str

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...

    def adapt(self, inp: AdaptInput) -> AdaptLog: ...

    def heads(self) -> OwnHeads | None: ...


# -- the old-class rules and the heads -------------------------------------------------------------
@dataclass
class StreamRules:
    """What every method gets around its backbone (the device's defaults)."""
    exemplars: int = 20               # per class, herding (edgecl.formats.exemplars); 0 = none
    replay: bool = True               # old classes' exemplars join each task's training images
    replay_share: float = 0.5         # ... repeated to about this share of the training data
    replay_seen: bool = False         # also replay exemplars of classes the task holds (B6: earlier cameras)
    old_update: str = "shift"         # old classes: shift (exemplar drift) | sdc | none
    heads: tuple[str, ...] = FAMILIES
    max_old_drop: float | None = None  # edgecl path: `adapt --max-old-drop` (None: not passed)
    # edgecl path: `edgecl delta --values`. fp32 (exact), as every B1/B6 run before int4 became the CLI's
    # default (2026-12-06); int4 over five chained rounds is measured as its own arm.
    delta_values: str = "fp32"


class HeadKeeper:
    def __init__(self, proto: StreamRules) -> None:
        self.p = proto
        self.protos: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.memory: dict[int, np.ndarray] = {}       # class -> exemplar pixels
        self.lda = self.lda_map = self.ranpac = None
        self.own: OwnHeads | None = None

    # the inputs of one adaptation
    def adapt_input(self, t: int, task: Task, before: np.ndarray) -> AdaptInput:
        px, lb = task.train.pixels, task.train.labels
        replay = [c for c in self.memory if self.p.replay_seen or c not in task.classes]
        if self.p.replay and replay:
            from edgecl.device.adapt import replay_repeats
            k = replay_repeats(len(px), sum(len(self.memory[c]) for c in replay), self.p.replay_share)
            px = np.concatenate([px, *[self.memory[c] for c in replay for _ in range(k)]])
            lb = np.concatenate([lb, *[np.full(len(self.memory[c]), c, lb.dtype) for c in replay for _ in range(k)]])
        targets = dict(self.current_protos())
        for c in task.classes:
            if c not in targets:
                targets[c] = before[task.train.labels == c].mean(axis=0)
        return AdaptInput(t, task, px, lb, targets)

    def current_protos(self) -> dict[int, np.ndarray]:
        return self.own.prototypes if self.own is not None else self.protos

    def update(self, learner: Learner, task: Task, before: np.ndarray, after: np.ndarray,
               ex_before: dict[int, np.ndarray]) -> None:
        from edgecl.formats.exemplars import herding_order
        labels = task.train.labels
        moved = bool(np.any(before != after))
        # The device's order (poststeps.shift_old_classes, compensate_old_classes): every class with
        # stored exemplars moves by its exemplars' drift, a class seen again (B6) included, before it is
        # merged; the rest by SDC.
        ex_after = {c: learner.embed(self.memory[c]) for c in ex_before} if moved else ex_before
        if moved:
            shifted = [c for c in ex_before if self.p.old_update == "shift" and c in self.protos]
            for c in shifted:
                self.protos[c] = classstats.shift_by_exemplars(self.protos[c], ex_before[c], ex_after[c])
            rest = [c for c in self.protos if c not in shifted]
            if self.p.old_update in ("shift", "sdc") and rest:
                moved_rows = classstats.compensate_drift(np.stack([self.protos[c] for c in rest]), before, after,
                                                         classstats.default_sigma(before, labels))
                self.protos.update({c: moved_rows[i] for i, c in enumerate(rest)})
        dim = after.shape[1]
        if "lda-map" in self.p.heads:
            self.lda_map = self.lda_map or LdaHead(dim)
            if moved and self.lda_map.means:
                fit_b = np.concatenate([before, *ex_before.values()])
                fit_a = np.concatenate([after, *ex_after.values()])
                self.lda_map.move(classstats.fit_linear_drift(fit_b, fit_a))
            self.lda_map.add(after, labels)
        if "lda" in self.p.heads:
            self.lda = self.lda or LdaHead(dim)
            self.lda.add(after, labels)
        if "ranpac" in self.p.heads:
            self.ranpac = self.ranpac or CachedRanpac(dim, RANPAC_M)
            self.ranpac.add(after, labels)
        for c in task.classes:
            rows = labels == c
            mean, n = after[rows].mean(axis=0), int(rows.sum())
            self.protos[c] = merge_mean(self.protos.get(c), self.counts.get(c, 0), mean, n)
            if self.lda_map is not None:
                prev = self.lda_map.means.get(c)
                self.lda_map.means[c] = merge_mean(prev, self.counts.get(c, 0) if prev is not None else 0, mean, n)
            self.counts[c] = self.counts.get(c, 0) + n
            if self.p.exemplars:
                idx = np.flatnonzero(rows)
                self.memory[c] = task.train.pixels[idx[herding_order(after[idx], self.p.exemplars)]]
        self.own = learner.heads()

    def snapshot_before(self, learner: Learner, task: Task) -> dict[int, np.ndarray]:
        """Call before adapting: the stored exemplars embedded with the backbone before (old space).

        A learner with its own heads moves its own statistics: nothing to embed for it."""
        if self.own is not None:
            return {}
        return {c: learner.embed(px) for c, px in self.memory.items() if c in self.protos}

    # scoring
    def predict(self, emb: np.ndarray) -> dict[str, np.ndarray]:
        protos = self.current_protos()
        ids = np.asarray(sorted(protos))
        means = np.stack([protos[c] for c in ids]).astype(np.float64)
        out = {"ncm": ids[np.argmax(_unit(emb) @ _unit(means).T, axis=1)]}
        lda_map = self.own.lda if (self.own is not None and self.own.lda is not None) else self.lda_map
        if lda_map is not None:  # cosine to the class means the drift map carried (the lda-map head's)
            mapped = np.stack([lda_map.means.get(c, protos[c]) for c in ids]).astype(np.float64)
            out["ncm-map"] = ids[np.argmax(_unit(emb) @ _unit(mapped).T, axis=1)]
        for key, head, m in (("lda", self.lda, means),
                             ("lda-map", lda_map, None)):
            if head is None:
                continue
            if m is None:
                m = np.stack([head.means.get(c, protos[c]) for c in ids]).astype(np.float64)
            for s in LDA_SHRINKAGE:
                head.shrinkage = s
                out[f"{key}:{s:g}"] = ids[head.logits(emb, m).argmax(axis=1)]
        if self.ranpac is not None:
            emb = np.asarray(emb, np.float64)  # one array object: the features are projected once
            for r in RANPAC_RIDGE:
                out[f"ranpac:{r:g}"] = ids[self.ranpac.logits(emb, list(ids), ridge=r).argmax(axis=1)]
        return out


class CachedRanpac(RanpacHead):
    """RanpacHead (ranpac.py); the random features of the last array scored are kept, so the ridge
    grid (one ``logits`` call per ridge) projects the embeddings once."""

    def features(self, embeddings: np.ndarray) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] is embeddings:
            return cache[1]
        h = super().features(embeddings)
        self._cache = (embeddings, h)
        return h


def merge_mean(prev: np.ndarray | None, prev_count: int, mean: np.ndarray, count: int) -> np.ndarray:
    """Count-weighted running mean, the device's rule for a class seen again (classstats.merge_by_counts)."""
    if prev is None or prev_count <= 0:
        return np.asarray(mean, np.float64)
    return classstats.merge_by_counts([prev, mean], [prev_count, count])[0]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


# -- the stream loop -------------------------------------------------------------------------------
def digits_accuracy(learner: Learner, stream: Stream) -> float:
    """Retention: cosine-prototype accuracy on the never-trained source proxy (scikit-learn digits)."""
    tr, te = stream.digits_train, stream.digits_test
    emb = learner.embed(tr.pixels)
    protos = {int(c): emb[tr.labels == c].mean(axis=0) for c in np.unique(tr.labels)}
    ids = np.asarray(sorted(protos))
    pred = ids[np.argmax(_unit(learner.embed(te.pixels)) @ _unit(np.stack([protos[c] for c in ids])).T, axis=1)]
    return 100.0 * float(np.mean(pred == te.labels))


def _score(keeper: HeadKeeper, learner: Learner, stream: Stream, t: int) -> dict[str, dict[str, Any]]:
    """Per head key and split: A_t over the seen groups, and the accuracy of every scored group."""
    scored = range(len(stream.tasks)) if stream.kind == "domain" else range(t + 1)
    groups = [getattr(stream.tasks[j], split) for split in ("val", "test") for j in scored]
    pooled = concat(groups)  # one embedding and one head solve for both splits
    preds = keeper.predict(learner.embed(pooled.pixels))
    bounds = np.cumsum([0] + [len(g.labels) for g in groups])
    n = len(scored)
    out: dict[str, dict[str, Any]] = {}
    for key, pred in preds.items():
        correct = pred == pooled.labels
        per = [100.0 * float(np.mean(correct[bounds[i]:bounds[i + 1]])) for i in range(len(groups))]
        h = out.setdefault(key, {})
        for s, split in enumerate(("val", "test")):
            seen = correct[bounds[s * n]:bounds[s * n + t + 1]]
            h[f"A_{split}"] = 100.0 * float(np.mean(seen))
            h[f"acc_{split}"] = per[s * n:(s + 1) * n]
    return out


def run_stream(learner: Learner, stream: Stream, proto: StreamRules, label: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    keeper = HeadKeeper(proto)
    record: dict[str, Any] = {"digits_before": digits_accuracy(learner, stream), "heads": {}, "adapt": []}
    for t, task in enumerate(stream.tasks):
        ex_before = keeper.snapshot_before(learner, task)
        before = learner.embed(task.train.pixels)
        inp = keeper.adapt_input(t, task, before)
        log = learner.adapt(inp)
        after = learner.embed(task.train.pixels) if log.steps else before
        keeper.update(learner, task, before, after, ex_before)
        for key, h in _score(keeper, learner, stream, t).items():
            acc = record["heads"].setdefault(key, {})
            for k, v in h.items():
                acc.setdefault(k, []).append(v)
        cf = log.changed_fraction
        record["adapt"].append({"steps": log.steps, "seconds": round(log.seconds, 1), "images": len(inp.labels),
                                "losses": [round(x, 4) for x in log.losses],
                                "changed_fraction_mean": float(np.mean(cf)) if cf else None,
                                "changed_fraction_max": float(np.max(cf)) if cf else None})
        ncm = record["heads"]["ncm"]
        print(f"  [{label}] task {t + 1}/{len(stream.tasks)}: ncm A_val {ncm['A_val'][-1]:.1f} "
              f"A_test {ncm['A_test'][-1]:.1f}  steps {log.steps}  {log.seconds:.0f}s  "
              f"losses {[round(x, 3) for x in log.losses]}", flush=True)
    record["digits_after"] = digits_accuracy(learner, stream)
    for h in record["heads"].values():
        h.update(derived(h))
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    return record


def derived(h: dict[str, Any]) -> dict[str, float]:
    out = {}
    for split in ("val", "test"):
        a, acc = h[f"A_{split}"], h[f"acc_{split}"]
        last = len(a) - 1
        drops = [max(acc[t][j] for t in range(j, last)) - acc[last][j] for j in range(last)]
        out |= {f"last_{split}": a[-1], f"mean_{split}": float(np.mean(a)),
                f"forgetting_{split}": float(np.mean(drops)) if drops else 0.0,
                f"first_group_{split}": acc[last][0], f"last_group_{split}": acc[last][last]}
    return out


# -- choosing on validation and summarising --------------------------------------------------------
METRICS = ("last", "mean", "forgetting", "first_group", "last_group")


def family(key: str) -> str:
    return key.split(":")[0]


def choose(runs: list[dict[str, Any]], fam: str, criterion: str = "mean_val") -> tuple[Any, str] | None:
    """(lr, head key) of ``fam`` with the best validation criterion averaged over seeds; ties: smaller lr."""
    cands = sorted({(r["lr"] or 0.0, k) for r in runs for k in r["heads"] if family(k) == fam})
    if not cands:
        return None

    def score(c: tuple[float, str]) -> float:
        vals = [r["heads"][c[1]][criterion] for r in runs if (r["lr"] or 0.0) == c[0] and c[1] in r["heads"]]
        return round(float(np.mean(vals)), 6)

    return max(cands, key=score)


def summarize(runs: list[dict[str, Any]], lr: float, key: str) -> dict[str, Any]:
    chosen = [r for r in runs if (r["lr"] or 0.0) == lr and key in r["heads"]]
    s: dict[str, Any] = {"lr": lr or None, "head": key, "seeds": [r["seed"] for r in chosen]}
    for m in METRICS:
        for split in ("val", "test"):
            vals = [r["heads"][key][f"{m}_{split}"] for r in chosen]
            s[f"{m}_{split}"] = float(np.mean(vals))
            s[f"{m}_{split}_std"] = float(statistics.pstdev(vals)) if len(vals) > 1 else 0.0
    for k in ("digits_before", "digits_after"):
        vals = [r[k] for r in chosen]
        s[k], s[k + "_std"] = float(np.mean(vals)), float(statistics.pstdev(vals)) if len(vals) > 1 else 0.0
    s["A_test"] = np.mean([r["heads"][key]["A_test"] for r in chosen], axis=0).tolist()
    accs = [r["heads"][key]["acc_test"] for r in chosen]  # ragged in B1 (groups seen so far)
    s["acc_test"] = [[float(np.mean([a[t][j] for a in accs])) for j in range(len(accs[0][t]))]
                     for t in range(len(accs[0]))]
    return s


def summarize_arms(runs: list[dict[str, Any]], arms: list[str], criterion: str = "mean_val") -> dict[str, Any]:
    """Per arm: each head family at its (lr, parameter) chosen on val, and the arm's best head."""
    out: dict[str, Any] = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        fams = {}
        for fam in FAMILIES:
            c = choose(mine, fam, criterion)
            if c is not None:
                fams[fam] = summarize(mine, *c)
        best = max(fams, key=lambda f: round(fams[f][criterion], 6))
        out[arm] = {"families": fams, "best": best, "lr_grid": sorted({r["lr"] or 0.0 for r in mine}),
                    "val_by_lr": {f"{lr:g}": float(np.mean([r["heads"]["ncm"][criterion] for r in mine
                                                            if (r["lr"] or 0.0) == lr]))
                                  for lr in sorted({r["lr"] or 0.0 for r in mine})}}
    return out


def split_data(stream: Stream) -> dict[str, Any]:
    return {"kind": stream.kind, "tasks": [t.name for t in stream.tasks],
            "train": [len(t.train.labels) for t in stream.tasks], "val": [len(t.val.labels) for t in stream.tasks],
            "test": [len(t.test.labels) for t in stream.tasks]}

