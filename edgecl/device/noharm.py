"""The do-no-harm check: score an adaptation on images it never trained on before keeping it.

(Not to be confused with the drop gate of each training step, ``update.py``, or the fleet's release
check, ``edgecl/release.py``.)

A share of each task class's images (and of each old class's stored exemplars) is held out of
training. After the loop, candidate states are built from the same training rows with the same
post-steps: the adapted state (its delta, statistics moved) and the prototypes-only one (old delta,
the task's classes added from the old backbone: what `--epochs 0` gives). Both are scored on the
held-out images with the head the device uses. The last epoch is kept unless it is worse; then the
state saved at the end of each earlier epoch is scored too, and the best of those that are not
worse is kept (``choose_epoch``); with none, prototypes only.
``--select-lr`` scores its (lr, epochs) trials with the same function.

``--max-old-drop POINTS`` guards the old classes on their held-out exemplars, image by image against
prototypes only, with a 95% upper confidence bound on the drop (``old_drop_upper``), not the observed
drop: a few held-out exemplars per class (B1: 4) cannot show a 1-point loss, so an observed "no image
lost" proves nothing (measured on B1, benchmarks/RESULTS.md#b1-guard). When even losing no image could not
bring the bound under POINTS (``guard_precheck``), nothing is trained: the run would be refused anyway.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecl.formats import manifest as mf

from .heads import LdaHead
from .poststeps import Heads, Moved, run_post_steps
from .state import RunDir, load_trainable
from .trainloop import TrainState, train

if TYPE_CHECKING:
    from .episode import Episode
    from .ort import StepSession
    from .plan import Plan

SELECT_LR_FACTORS = (0.1, 1.0, 10.0)  # --select-lr grid around the chosen lr
GUARD_CONFIDENCE = 0.95                # --max-old-drop: the drop's upper bound holds at this confidence


def holdout_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out round(share * n) rows (at least one when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held: list[int] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = max(1, int(round(share * len(rows)))) if len(rows) >= 2 else 0
        held.extend(rows[:k])
        train.extend(rows[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))


@dataclass
class HeldOut:
    embeddings_of: Callable[[np.ndarray], np.ndarray]   # delta -> [M, D] held-out images embedded
    names: list[str]                                     # true class of each held-out image
    old: np.ndarray | None = None                        # [M] bool: an image of what the device already knew
                                                         # (an old class's held-out exemplar)

    def __len__(self) -> int:
        return len(self.names)

    def old_names(self) -> list[str]:
        return [n for n, o in zip(self.names, self._old(), strict=True) if o]

    def _old(self) -> np.ndarray:
        return self.old if self.old is not None else np.zeros(len(self.names), bool)


def correct(heads: Heads, embeddings: np.ndarray, names: list[str], head: str) -> np.ndarray:
    """[M] bool: ``heads`` classifies each embedded image as its true class ``names[i]``."""
    protos = heads.prototypes
    if not len(names) or not len(protos):
        return np.zeros(len(names), bool)
    if head == "lda":
        lda: LdaHead = heads.lda
        scores = lda.logits(embeddings, lda.means_for(protos.classes, protos.means))
    else:
        e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        p = protos.means / np.maximum(np.linalg.norm(protos.means, axis=1, keepdims=True), 1e-12)
        scores = e @ p.T
    return np.array([protos.classes[j] == name for j, name in zip(np.argmax(scores, axis=1), names, strict=True)], bool)


def summarize(right: np.ndarray, names: list[str]) -> tuple[float, dict[str, float]]:
    """(accuracy, accuracy per true class) from each image's correctness."""
    if not len(names):
        return float("nan"), {}
    true = np.asarray(names)
    return float(right.mean()), {c: float(right[true == c].mean()) for c in sorted(set(names))}


def accuracy(heads: Heads, embeddings: np.ndarray, names: list[str], head: str) -> tuple[float, dict[str, float]]:
    """(accuracy, accuracy per true class) of ``heads`` on embedded images with true class ``names``."""
    if not len(heads.prototypes):
        return float("nan"), {}
    return summarize(correct(heads, embeddings, names, head), names)


# -- the old classes' guard (--max-old-drop): a confidence bound on the drop -----------------------

def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n up to many thousands)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(f: Callable[[float], bool], lo: float, hi: float) -> float:
    """The boundary in [lo, hi] where ``f`` turns from True to False (f monotone), to 1e-9."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) else (lo, mid)
    return hi


def rate_upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound of a rate seen k times in n, at confidence 1 - alpha."""
    if n == 0 or k >= n:
        return 1.0
    return _bisect(lambda p: _binom_cdf(k, n, p) > alpha, k / n, 1.0)


def rate_lower(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided lower bound of a rate seen k times in n, at confidence 1 - alpha."""
    if n == 0 or k <= 0:
        return 0.0
    return _bisect(lambda p: 1.0 - _binom_cdf(k - 1, n, p) < alpha, 0.0, k / n)


def old_drop_upper(before: np.ndarray, after: np.ndarray, confidence: float = GUARD_CONFIDENCE) -> float:
    """Upper bound (fraction, at ``confidence``) on how much accuracy the old classes lose from ``before``
    to ``after`` (each image's correctness, the same images: a paired comparison).

    The drop is the share of images lost (right before, wrong after) minus the share gained: bounded by
    the lost share's upper bound minus the gained share's lower bound, each at half the risk (a union
    bound). With n images and none lost or gained the bound is 1 - (alpha / 2) ** (1 / n): 1 point
    needs 368 images, 5 points 72, 10 points 36 (B1's last task holds 32: 10.9 points)."""
    n = len(before)
    if n == 0:
        return 0.0
    alpha = (1.0 - confidence) / 2
    lost = int(np.sum(before & ~after))
    gained = int(np.sum(~before & after))
    return rate_upper(lost, n, alpha) - rate_lower(gained, n, alpha)


def old_images_needed(points: float, confidence: float = GUARD_CONFIDENCE) -> int | None:
    """How many held-out old images a run that loses and gains none needs for the bound to be <= points
    (None: no number does, i.e. points == 0)."""
    if points <= 0:
        return None
    if points >= 100:
        return 1
    alpha = (1.0 - confidence) / 2
    return int(math.ceil(math.log(alpha) / math.log1p(-points / 100.0)))


def guard_allows(upper: float, points: float) -> bool:
    return upper <= points / 100.0 + 1e-9


def choose_epoch(prototypes_only: float, epochs: dict[int, float], guarded: dict[int, bool] | None = None) -> int | None:
    """The epoch whose state to keep, or None for prototypes only, from held-out accuracies.

    The last epoch (the validated schedule) whenever it is not worse than prototypes only: choosing
    among epochs on a few dozen held-out images would fit their noise (measured in `make demo`: the
    held-out maximum, epoch 6 of 10, scored 67.8% on device A's test classes, the last epoch 74.2%).
    Otherwise the best earlier epoch that is not worse (ties: the later one), so an adaptation that
    went wrong late keeps what it gained before; none -> prototypes only. Ties keep the adaptation:
    "never keeps an adaptation that made it worse". ``guarded[e]`` False (``--max-old-drop``: the old
    classes lost more than allowed after epoch e) rules an epoch out whatever its overall accuracy.
    """
    ok = guarded or {}
    last = max(epochs)
    if epochs[last] >= prototypes_only and ok.get(last, True):
        return last
    fine = [e for e, accuracy in epochs.items() if accuracy >= prototypes_only and ok.get(e, True)]
    return max(fine, key=lambda e: (epochs[e], e)) if fine else None


def score(start: Heads, moved: Moved, held: HeldOut, delta: np.ndarray, head: str) -> tuple[float, dict[str, float]]:
    """Held-out accuracy (overall, per class) of the state that ``moved`` (built on the training rows) leads to."""
    return summarize(score_images(start, moved, held, delta, head), held.names)


def score_images(start: Heads, moved: Moved, held: HeldOut, delta: np.ndarray, head: str) -> np.ndarray:
    """[M] bool: each held-out image classified right by the state that ``moved`` leads to."""
    heads = run_post_steps(start, moved)
    if not len(heads.prototypes):
        return np.zeros(len(held), bool)
    return correct(heads, held.embeddings_of(delta), held.names, head)


def old_accuracy(per_class: dict[str, float], held: HeldOut) -> float | None:
    """Accuracy on the held-out images of what the device already knew (its old classes' exemplars),
    from the per-class accuracies (each class weighted by its held-out images); None without any."""
    names = held.old_names()
    if not names:
        return None
    counts = {c: names.count(c) for c in set(names)}
    return sum(per_class.get(c, 0.0) * n for c, n in counts.items()) / len(names)


@dataclass
class Verdict:
    """What the check decided: which trainable values to commit and what it saw."""
    keep: bool                                # the adaptation is kept (else prototypes only)
    trainable: dict[str, np.ndarray]          # the values of the kept epoch (the loop's last when not judged)
    kept_epochs: int                          # the epochs of training the committed state holds (0: none)
    report: dict[str, Any] | None             # held-out accuracies (None when nothing was judged)

    @property
    def kept_delta(self) -> np.ndarray | None:
        return self.trainable[mf.DELTA_PARAM] if self.keep else None


def _prototypes_only(episode: Episode, plan: Plan, held: HeldOut) -> np.ndarray:
    """Each held-out image's correctness with prototypes only (the backbone as it was)."""
    moved = episode.moved(None, training_rows_only=True)
    return score_images(episode.start_heads, moved, held, episode.current.delta, plan.head)


def _guard_report(plan: Plan, n_old: int) -> dict[str, Any]:
    return {"max_old_drop": plan.max_old_drop, "old_held_out_images": n_old,
            "old_confidence": GUARD_CONFIDENCE,
            "old_images_needed": old_images_needed(plan.max_old_drop) if plan.max_old_drop is not None else None}


def guard_precheck(episode: Episode, plan: Plan) -> Verdict | None:
    """``--max-old-drop``: when the old classes' held-out images are too few for the bound to reach POINTS
    even if training lost none of them (and won back every one prototypes only gets wrong), any epoch
    would be refused: the refusal, before any training (the same state an epoch-by-epoch refusal commits).
    None when the guard is off, nothing is judged, or the bound can be met."""
    if plan.max_old_drop is None or not (plan.gate and episode.judged and plan.epochs > 0):
        return None
    held = episode.held_out()
    old = held._old()
    if not old.any():
        return None
    before = _prototypes_only(episode, plan, held)
    best_case = old_drop_upper(before[old], np.ones(int(old.sum()), bool))
    if guard_allows(best_case, plan.max_old_drop):
        return None
    accuracy_before, per_class = summarize(before, held.names)
    report = {"head": plan.head, "held_out_images": len(held), "adapted_accuracy": accuracy_before,
              "adapted_epochs": 0,
              "prototypes_only_accuracy": accuracy_before, "kept": "prototypes-only", "epochs": [],
              "prototypes_only_old_accuracy": old_accuracy(per_class, held), **_guard_report(plan, int(old.sum())),
              "old_drop_upper_best_case": 100 * best_case,
              "before_per_class": per_class, "after_per_class": per_class}
    needed = report["old_images_needed"]
    warnings.warn(f"--max-old-drop {plan.max_old_drop:g}: {int(old.sum())} held-out images of the old classes "
                  f"cannot show a loss under {plan.max_old_drop:g} points at {GUARD_CONFIDENCE:.0%} confidence "
                  f"(even losing none, the bound is {100 * best_case:.1f} points"
                  + (f"; it takes about {needed}" if needed else "") + "): nothing was trained, the task's "
                  "classes were added from the backbone as it was (store more exemplars, or allow more points)",
                  stacklevel=3)
    return Verdict(False, {}, 0, report)


def judge(episode: Episode, plan: Plan, state: TrainState, run_dir: RunDir) -> Verdict:
    """The adapted state vs prototypes only, each built on the training rows with the same post-steps,
    scored on the held-out images. The last epoch is kept unless it is worse; then the earlier epochs
    (saved by the loop at each epoch's end) are judged too, and the best one that is not worse is kept."""
    current_delta = episode.current.delta
    trained = bool(np.any(state.delta != current_delta))
    if not (trained and plan.gate and episode.judged):
        return Verdict(trained, state.trainable(), plan.epochs if trained else 0, None)
    held = episode.held_out()
    old = held._old()

    def held_out(delta: np.ndarray) -> tuple[float, dict[str, float], np.ndarray]:
        right = score_images(episode.start_heads, episode.moved(delta, training_rows_only=True), held, delta,
                             plan.head)
        return (*summarize(right, held.names), right)

    before = _prototypes_only(episode, plan, held)
    frozen, frozen_per_class = summarize(before, held.names)
    frozen_old = old_accuracy(frozen_per_class, held)

    def drop_upper(right: np.ndarray) -> float | None:
        return old_drop_upper(before[old], right[old]) if old.any() else None

    def guarded(right: np.ndarray) -> bool:
        """--max-old-drop: with 95% confidence the old classes lost no more than that many points."""
        upper = drop_upper(right)
        return plan.max_old_drop is None or upper is None or guard_allows(upper, plan.max_old_drop)

    epoch_files = run_dir.epoch_states()
    last = max(epoch_files, default=plan.epochs)  # the loop saves every epoch's end; the last is state.trainable()
    scored = {last: (*held_out(state.delta), state.trainable())}
    if scored[last][0] < frozen or not guarded(scored[last][2]):
        for epoch in sorted(epoch_files)[:-1]:
            values = load_trainable(epoch_files[epoch], episode.bundle.mask.total_selected)
            scored[epoch] = (*held_out(values[mf.DELTA_PARAM]), values)
    chosen = choose_epoch(frozen, {e: acc for e, (acc, _, _, _) in scored.items()},
                          {e: guarded(right) for e, (_, _, right, _) in scored.items()})
    keep = chosen is not None
    best = chosen if chosen is not None else max(scored, key=lambda e: (scored[e][0], e))
    adapted, adapted_per_class, _, values = scored[best]

    def epoch_report(e: int) -> dict[str, Any]:
        upper = drop_upper(scored[e][2])
        return {"epochs": e, "accuracy": scored[e][0], "old_accuracy": old_accuracy(scored[e][1], held),
                **({"old_drop_upper": 100 * upper} if upper is not None and plan.max_old_drop is not None else {})}

    # before = prototypes only (the backbone as it was), after = what is kept: the delta's held-out report
    report = {"head": plan.head, "held_out_images": len(held), "adapted_accuracy": adapted,
              "adapted_epochs": best, "prototypes_only_accuracy": frozen,
              "kept": "adapted" if keep else "prototypes-only",
              "epochs": [epoch_report(e) for e in sorted(scored)],
              "prototypes_only_old_accuracy": frozen_old, **_guard_report(plan, int(old.sum())),
              "before_per_class": frozen_per_class,
              "after_per_class": adapted_per_class if keep else frozen_per_class}
    if not keep:
        guard = (f", or could lose more than {plan.max_old_drop:g} points on the old classes (95% bound)"
                 if plan.max_old_drop is not None else "")
        warnings.warn(f"the adaptation was worse on {len(held)} held-out images after every epoch{guard} (best "
                      f"{adapted:.3f} after epoch {best} vs {frozen:.3f} with prototypes only): kept the "
                      "backbone as it was, added the task's classes from it", stacklevel=3)
        return Verdict(False, state.trainable(), 0, report)
    if best != last:
        warnings.warn(f"the last epoch was worse on {len(held)} held-out images ({scored[last][0]:.3f} vs "
                      f"{frozen:.3f} with prototypes only): kept epoch {best} of {last} ({adapted:.3f})",
                      stacklevel=3)
    return Verdict(True, values, best, report)


def select_lr(episode: Episode, plan: Plan, session: StepSession, start: dict[str, np.ndarray],
              scale: np.ndarray) -> dict[str, Any]:
    """``--select-lr``: a grid over lr x epochs, scored like the check: held-out accuracy over old + task classes.

    Epoch 0 (no training) is a candidate, so the choice is never worse than prototypes only on the
    split. Ties go to fewer epochs, then the smaller lr: less movement, less forgetting.
    """
    held = episode.held_out()
    delta0 = start[mf.DELTA_PARAM]

    def held_out(delta: np.ndarray | None) -> float:
        moved = episode.moved(delta, training_rows_only=True)
        return score(episode.start_heads, moved, held, delta0 if delta is None else delta, plan.head)[0]

    trials = [{"lr": 0.0, "epochs": 0, "accuracy": held_out(None)}]
    for factor in SELECT_LR_FACTORS:
        sub = plan.sub(lr=plan.lr * factor)
        state = TrainState.fresh(plan.seed, start)
        for epoch in range(plan.epochs):
            train(sub.sub(epochs=epoch + 1), episode.train_set, session, state, scale, episode.bundle.manifest)
            trials.append({"lr": sub.lr, "epochs": epoch + 1, "accuracy": held_out(state.delta)})
    best = max(trials, key=lambda t: (t["accuracy"], -t["epochs"], -t["lr"]))
    return {"chosen": best, "trials": trials, "held_out_images": len(held)}
