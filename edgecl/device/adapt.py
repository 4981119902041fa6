"""`edgecl adapt`: drop-gated sparse tuning on the device, then the class statistics, then commit.

Reads top to bottom:
1. plan   : options + device profile + bundle defaults -> one frozen Plan (plan.py);
2. inputs : the task's images, the current state, the exemplar memory; a held-out share of each
            class for the do-no-harm gate; the training set (task rows + replayed exemplars);
3. state  : a fresh TrainState, or the interrupted run's last checkpoint (--resume);
4. loop   : trainloop.train (step graph on plain onnxruntime, numpy gate + sparse SGD);
5. gate   : adapted vs prototypes-only on the held-out images; the last epoch, else the best earlier
            one that is not worse, else prototypes only (gate.py);
6. post-steps on every task image (poststeps.py): prototypes, exemplar shift, SDC, LDA drift map,
            memory;
7. commit : a new generation, atomically; the previous state stays for `edgecl rollback`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DataError, DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_bytes
from edgecl.formats.images import LoadedImages, load_image_folder
from edgecl.formats.prototypes import Prototypes, image_fingerprints
from edgecl.formats.weights import load_weights

from .gate import HeldOut, choose_epoch, holdout_split, score
from .heads import LdaHead
from .infer import create_runner, embed_and_score, resolve_profile
from .ort import StepSession, check_provider
from .plan import AdaptOptions, Plan, check_replay_share, resolve_plan
from .poststeps import Heads, Moved, run_post_steps
from .state import (
    BASE_PROTOTYPES,
    EXEMPLARS,
    LDA,
    PROTOTYPES,
    STEP_LOG,
    TRAINABLE,
    Bundle,
    DeviceState,
    RunDir,
    bundle_lock,
    bundle_prototypes,
    check_resumable,
    commit_generation,
    load_current,
    load_trainable,
    open_bundle,
    save_trainable,
)
from .trainloop import TrainSet, TrainState, steps_per_epoch, train
from .update import overlap_scale

SELECT_LR_FACTORS = (0.1, 1.0, 10.0)  # --select-lr grid around the chosen lr

__all__ = ["AdaptOptions", "AdaptReport", "adapt", "replay_repeats"]


@dataclass
class AdaptReport:
    state: str                            # the committed generation
    steps: int
    epochs: int
    images: int
    skipped_unreadable: int
    classes_updated: list[str]
    classes_added: list[str]
    lr: float
    final_loss: float | None
    changed_fraction_mean: float          # changed delta entries / all model weights, mean over steps
    changed_fraction_max: float
    step_seconds_median: float | None
    peak_rss_mb: float
    memory_budget_mb: int
    drift_compensated: list[str] = field(default_factory=list)
    from_exemplars: list[str] = field(default_factory=list)
    replayed: int = 0                     # exemplar images of old classes mixed into the training data
    lda_moved: bool = False               # the LDA head's statistics were carried through the drift map
    exemplar_bytes: int = 0
    selection: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None    # held-out accuracy: adapted vs prototypes only, and which was kept
    kept: str = "adapted"                 # "adapted" | "prototypes-only" (no training, or the gate refused it)
    kept_epochs: int = 0                  # the epochs of training the committed state holds (0: none kept)
    resumed_from_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def replay_repeats(n_task: int, n_exemplars: int, share: float) -> int:
    """How many times to repeat the exemplars so they make up about ``share`` of the training data.

    A few exemplars per old class beside hundreds of new images barely register in the loss; repeating
    them (each repeat gets fresh augmentations) lets the old classes weigh in. share 0 = once.
    """
    check_replay_share(share)
    if n_exemplars == 0 or share == 0.0:
        return 1
    return max(1, int(round(share / (1.0 - share) * n_task / n_exemplars)))


# -- 2. inputs -------------------------------------------------------------------------------------

def _load_task(bundle: Bundle, data_dir: str | Path) -> LoadedImages:
    m = bundle.manifest
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipped ")  # the skip count is reported once, below and in the report
        data = load_image_folder(data_dir, m.input_size, m.interpolation)
    if data.skipped:
        warnings.warn(f"skipped {len(data.skipped)} unreadable image(s) in {data_dir}, e.g. {data.skipped[0][0]}",
                      stacklevel=3)
    return data


def _fingerprint(data: LoadedImages, root: Path) -> str:
    names = [f"{p.relative_to(root) if p.is_relative_to(root) else p}:{p.stat().st_size}" for p in data.paths]
    return sha256_bytes(os.fsencode("\n".join(names)))  # a file name need not be UTF-8


def _load_memory(current: DeviceState, bundle: Bundle, use: bool) -> ExemplarMemory:
    if use and current.exemplars_path:
        return ExemplarMemory.load_file(current.exemplars_path)
    if use and bundle.path(mf.EXEMPLARS).exists():
        # First adaptation: start from the calibration exemplars the host shipped in the bundle.
        return ExemplarMemory.load_file(bundle.path(mf.EXEMPLARS))
    h, w = bundle.manifest.input_size
    return ExemplarMemory.empty((int(h), int(w)))


def _start_trainable(current: DeviceState, bundle: Bundle) -> dict[str, np.ndarray]:
    if current.trainable and mf.PROJ_WEIGHT in current.trainable:
        return current.trainable
    head = load_weights(bundle.path(mf.HEAD_INIT), [mf.PROJ_WEIGHT, mf.PROJ_BIAS])
    return {mf.DELTA_PARAM: current.delta, **head}


@dataclass
class Split:
    """Which rows train and which are held out (the gate, --select-lr); all rows train without one."""
    task_train: np.ndarray
    task_held: np.ndarray
    exemplar_train: dict[str, np.ndarray]   # class -> rows of memory.of_class(class)
    exemplar_held: dict[str, np.ndarray]


def _split(task: LoadedImages, memory: ExemplarMemory, classes: list[str], plan: Plan, hold: bool,
           counted: Prototypes | None = None, fingerprints: np.ndarray | None = None) -> Split:
    all_rows = {c: np.arange(len(memory.of_class(c))) for c in classes}
    if not hold:
        return Split(np.arange(len(task.labels)), np.zeros(0, np.int64), all_rows, {c: all_rows[c][:0] for c in classes})
    # Only images no class mean counts yet can judge: one the statistics already hold (the same folder
    # adapted again, after `--epochs 0` or export --data) would favour the state that holds it as it was.
    fresh = np.ones(len(task.labels), bool)
    if counted is not None and counted.seen:
        assert fingerprints is not None, "pass the task's image_fingerprints with the counted prototypes"
        for i, name in enumerate(task.classes):
            rows = task.labels == i
            fresh[rows] = ~counted.seen_mask(name, fingerprints[rows])
    candidates = np.flatnonzero(fresh)
    train_rows, held_rows = holdout_split(task.labels[candidates], plan.holdout_share, plan.seed)
    train_rows, held_rows = np.sort(np.concatenate([candidates[train_rows], np.flatnonzero(~fresh)])), candidates[held_rows]
    ex_train, ex_held = {}, {}
    for c in classes:
        n = len(all_rows[c])
        ex_train[c], ex_held[c] = holdout_split(np.zeros(n, np.int64), plan.holdout_share, plan.seed) if n else \
            (all_rows[c], all_rows[c])
    return Split(train_rows, held_rows, ex_train, ex_held)


def _train_set(task: LoadedImages, memory: ExemplarMemory, split: Split, replay_names: list[str], plan: Plan) -> TrainSet:
    pixels, labels = task.pixels[split.task_train], task.labels[split.task_train]
    if not replay_names:
        return TrainSet(pixels, labels, list(task.classes))
    # Replay: the old classes' exemplars join the task's images (labels after the task's), so the
    # contrastive loss also pushes the new classes away from the old ones instead of only apart
    # from each other; the backbone then moves where it helps every class seen so far.
    # A replayed class the task also holds keeps the task's label (the same product, another camera).
    names = list(task.classes) + [c for c in replay_names if c not in task.classes]
    replayed = [memory.of_class(c)[split.exemplar_train[c]] for c in replay_names]
    k = replay_repeats(len(pixels), sum(len(px) for px in replayed), plan.replay_share)
    return TrainSet(np.concatenate([pixels, *[px for px in replayed for _ in range(k)]]),
                    np.concatenate([labels, *[np.full(len(px), names.index(c), labels.dtype)
                                              for c, px in zip(replay_names, replayed, strict=True) for _ in range(k)]]),
                    names)


# -- the adaptation --------------------------------------------------------------------------------

def base_prototypes_after(current: DeviceState, bundle: Bundle, task: LoadedImages, fingerprints: np.ndarray,
                          embed_base: Callable[[np.ndarray], np.ndarray]) -> Prototypes:
    """The state's base-space table after this task: each task class the bundle does not ship, its
    previous base-space mean merged by counts with this task's images under the bundle's backbone
    (``embed_base``, called only when some image is new), each image counted once (the rule the
    prototypes follow: images the state already counts for a class are skipped)."""
    table = (Prototypes.load_file(current.base_prototypes_path) if current.base_prototypes_path is not None
             else Prototypes.empty(int(current.prototypes.means.shape[1])))
    shipped = set(bundle_prototypes(bundle).classes)
    new_rows: dict[str, np.ndarray] = {}
    for i, name in enumerate(task.classes):
        rows = np.flatnonzero(task.labels == i)
        rows = rows[~current.prototypes.seen_mask(name, fingerprints[rows])]
        if name not in shipped and rows.size:
            new_rows[name] = rows
    if not new_rows:
        return table
    base_embeddings = embed_base(task.pixels)
    for name, rows in new_rows.items():
        new_sum, n_new = base_embeddings[rows].astype(np.float64).sum(0), int(rows.size)
        if name in table.classes:
            j = table.classes.index(name)
            n_old = int(table.counts[j])
            table.upsert(name, (table.means[j].astype(np.float64) * n_old + new_sum) / (n_old + n_new), n_old + n_new)
        else:
            table.upsert(name, new_sum / n_new, n_new)
    return table


def adapt(bundle_dir: str | Path, data_dir: str | Path, options: AdaptOptions | None = None,
          profile: str | Path | DeviceProfile | None = None) -> AdaptReport:
    opts = options or AdaptOptions()
    bundle = open_bundle(bundle_dir)
    prof = resolve_profile(profile, bundle)  # --device > the bundle's export profile > built-in default
    check_provider(prof.execution_provider)  # before any work: a clear error, nothing written
    with bundle_lock(bundle, "adapt"):
        return _adapt(bundle, Path(data_dir), opts, prof)


def _adapt(bundle: Bundle, data_dir: Path, opts: AdaptOptions, prof: DeviceProfile) -> AdaptReport:  # noqa: C901
    m = bundle.manifest
    # 1. plan
    plan = resolve_plan(opts, prof, m, bundle.mask.total_selected)
    run_dir = RunDir(bundle)
    if opts.resume and not run_dir.exists():
        raise DeviceError("there is no interrupted adaptation to resume", "run `edgecl adapt` without --resume")

    # 2. inputs
    task = _load_task(bundle, data_dir)
    current = load_current(bundle)
    memory = _load_memory(current, bundle, plan.use_exemplars)
    known = [c for c in memory.classes if c in current.prototypes.classes and len(memory.of_class(c))]
    # Replay every class the memory holds: old classes, and a task class seen before (its earlier
    # camera's exemplars: B6 measured +1.5 points on the last camera, docs/benchmarks.md#b6).
    replay_names = list(known) if plan.replay and plan.epochs > 0 else []
    hold = plan.epochs > 0 and (plan.gate or plan.select_lr)
    fingerprints = image_fingerprints(task.pixels)  # once: the split and every post-step run use them
    split = _split(task, memory, known, plan, hold, current.prototypes, fingerprints)
    if hold and not len(split.task_held):
        if plan.select_lr:
            raise DataError("--select-lr needs at least two images per class", "add images or drop --select-lr")
        warnings.warn("too few images the class statistics do not already count to hold any out: the do-no-harm "
                      "gate is off for this run (show the device new images of the task's classes to judge)",
                      stacklevel=3)
        hold, split = False, _split(task, memory, known, plan, False)
    data = _train_set(task, memory, split, replay_names, plan)
    config: dict[str, Any] = {"parent": current.generation, "data": _fingerprint(task, data_dir), "classes": task.classes,
              "plan": plan.fingerprint(), "replay": replay_names}
    runner = create_runner(bundle, prof)

    def embed(pixels: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return embed_and_score(runner, bundle, pixels, delta)[0]

    lda = LdaHead.load_file(current.lda_path) if current.lda_path is not None else LdaHead(int(m.embedding_dim))
    start_heads = Heads(current.prototypes, lda, memory)
    ex_before = {c: embed(memory.of_class(c), current.delta) for c in known}
    held_pixels = np.concatenate([task.pixels[split.task_held]] +
                                 [memory.of_class(c)[split.exemplar_held[c]] for c in known])
    held_names = ([task.classes[y] for y in task.labels[split.task_held]] +
                  [c for c in known for _ in split.exemplar_held[c]])
    held_cache: dict[bytes, np.ndarray] = {}

    def held_embeddings(delta: np.ndarray) -> np.ndarray:
        key = delta.tobytes()
        if key not in held_cache:
            held_cache.clear()
            held_cache[key] = embed(held_pixels, delta)
        return held_cache[key]

    held = HeldOut(held_embeddings, held_names)

    def moved_on(rows: np.ndarray, ex_rows: dict[str, np.ndarray], before_all: np.ndarray,
                 delta: np.ndarray | None) -> Moved:
        """The statistics' inputs on these rows: delta None = the backbone did not move."""
        after_all = before_all if delta is None else embed(task.pixels[rows], delta)
        ex_after = ex_before if delta is None else {c: embed(memory.of_class(c), delta) for c in known}
        return Moved(trained=delta is not None, task_pixels=task.pixels[rows], task_labels=task.labels[rows],
                     task_fingerprints=fingerprints[rows],
                     task_classes=list(task.classes), before=before_all if delta is None else before_all,
                     after=after_all,
                     exemplars_before={c: ex_before[c][ex_rows[c]] for c in known},
                     exemplars_after={c: ex_after[c][ex_rows[c]] for c in known},
                     drift_sigma=plan.drift_sigma, drift_compensation=plan.drift_compensation,
                     use_exemplars=plan.use_exemplars, exemplar_budget_bytes=prof.exemplar_budget_mb * 1024 * 1024)

    # 3. state: a fresh run embeds the task before training; a resumed one reads what it stored
    start = _start_trainable(current, bundle)
    def step_session() -> StepSession:
        return StepSession(bundle.path(mf.TRAIN_STEP), threads=prof.threads, provider=prof.execution_provider)

    scale = overlap_scale(bundle.mask.overlap_vector(), plan.overlap_decay)
    selection = None
    resumed_from = None
    if opts.resume:
        check_resumable(run_dir, config, current.generation)
        saved = run_dir.config()
        before = run_dir.start_arrays()["before"]
        plan = plan.sub(lr=saved["run_lr"], epochs=saved["run_epochs"])
        selection = saved.get("selection")
    else:
        if run_dir.exists():
            warnings.warn("discarding an interrupted adaptation (pass --resume to continue it)", stacklevel=3)
        before = embed(task.pixels, current.delta)
        if plan.select_lr:
            selection = _select_lr(plan, data, step_session(), start, scale, m, start_heads, held, split,
                                   lambda d: moved_on(split.task_train, split.exemplar_train,
                                                      before[split.task_train], d))
            plan = plan.sub(lr=selection["chosen"]["lr"], epochs=selection["chosen"]["epochs"])
        run_dir.start({**config, "run_lr": plan.lr, "run_epochs": plan.epochs, "selection": selection},
                      {"before": before})
    config = {**config, "run_lr": plan.lr, "run_epochs": plan.epochs, "selection": selection}
    state = TrainState.fresh(plan.seed, start)
    latest = run_dir.latest() if opts.resume else None
    if latest is not None:
        state = TrainState.load(latest[0], latest[1], bundle.mask.total_selected)
        resumed_from = state.step
    run_dir.truncate_log(state.step)

    # 4. loop. Peak memory: never hold the inference session and the step session at once.
    held_embeddings(current.delta)  # the gate's baseline, embedded before the inference session goes
    runner.release()
    session = step_session()
    bar = None
    total = plan.epochs * steps_per_epoch(len(data.pixels), plan.batch_size)
    if plan.progress and total:
        from edgecl.progress import progress_bar
        bar = progress_bar(total, "adapt", unit="step")
        bar.update(state.step)
    judge = hold and plan.gate

    def checkpoint(s: TrainState) -> None:
        if judge and s.batch == 0:  # an epoch just ended: its state is one of the gate's candidates
            run_dir.save_epoch(s.epoch, s.trainable())  # before the checkpoint, so a resume never lacks it
        s.save(run_dir)

    with open(run_dir.log_path, "a") as log_file:
        def log(record: dict[str, Any]) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        try:
            train(plan, data, session, state, scale, m, log=log, checkpoint=checkpoint, bar=bar)
        finally:
            if bar is not None:
                bar.close()
    trained = bool(np.any(state.delta != current.delta))
    del session

    # 5. gate: the adapted state vs prototypes only, each built on the training rows with the same
    # post-steps, scored on the held-out images. The last epoch is kept unless it is worse; then the
    # earlier epochs are judged too, and the best one that is not worse is kept (gate.choose_epoch).
    gate_report = None
    keep, kept_trainable, kept_epochs = trained, state.trainable(), plan.epochs if trained else 0
    if trained and judge:
        train_before = before[split.task_train]

        def held_out(delta: np.ndarray | None) -> tuple[float, dict[str, float]]:
            moved = moved_on(split.task_train, split.exemplar_train, train_before, delta)
            return score(start_heads, moved, held, current.delta if delta is None else delta, plan.head)

        frozen, frozen_per_class = held_out(None)
        epoch_files = run_dir.epoch_states()
        last = max(epoch_files, default=plan.epochs)  # the loop saves every epoch's end; the last is state.trainable()
        scored = {last: (*held_out(state.delta), state.trainable())}
        if scored[last][0] < frozen:
            for epoch in sorted(epoch_files)[:-1]:
                values = load_trainable(epoch_files[epoch], bundle.mask.total_selected)
                scored[epoch] = (*held_out(values[mf.DELTA_PARAM]), values)
        chosen = choose_epoch(frozen, {e: acc for e, (acc, _, _) in scored.items()})
        keep = chosen is not None
        best = chosen if chosen is not None else max(scored, key=lambda e: (scored[e][0], e))
        adapted, adapted_per_class, values = scored[best]
        if keep:
            kept_epochs, kept_trainable = best, values
        # before = prototypes only (the backbone as it was), after = what is kept: the delta's held-out report
        gate_report = {"head": plan.head, "held_out_images": len(held), "adapted_accuracy": adapted,
                       "adapted_epochs": best, "prototypes_only_accuracy": frozen,
                       "kept": "adapted" if keep else "prototypes-only",
                       "epochs": [{"epochs": e, "accuracy": scored[e][0]} for e in sorted(scored)],
                       "before_per_class": frozen_per_class,
                       "after_per_class": adapted_per_class if keep else frozen_per_class}
        if not keep:
            kept_epochs = 0
            warnings.warn(f"the adaptation was worse on {len(held)} held-out images after every epoch (best "
                          f"{adapted:.3f} after epoch {best} vs {frozen:.3f} with prototypes only): kept the "
                          "backbone as it was, added the task's classes from it", stacklevel=3)
        elif best != last:
            warnings.warn(f"the last epoch was worse on {len(held)} held-out images ({scored[last][0]:.3f} vs "
                          f"{frozen:.3f} with prototypes only): kept epoch {best} of {last} ({adapted:.3f})",
                          stacklevel=3)
    kept_delta = kept_trainable[mf.DELTA_PARAM] if keep else None

    # 6. post-steps on every task image with the kept backbone
    all_rows = np.arange(len(task.labels))
    all_ex = {c: np.arange(len(memory.of_class(c))) for c in known}
    heads = run_post_steps(start_heads, moved_on(all_rows, all_ex, before, kept_delta))
    # The task's new classes as the bundle's own backbone places them, from every image: the release
    # gate's frozen baseline, which only the device (holding the images) can compute. `before` is
    # that already when this adaptation started from the bundle's weights.
    base_table = base_prototypes_after(
        current, bundle, task, fingerprints,
        lambda pixels: before if not np.any(current.delta) else embed(pixels, np.zeros_like(current.delta)))

    # 7. commit: a new generation, then HEAD; the previous state stays for rollback
    records = [json.loads(line) for line in run_dir.log_path.read_text().splitlines() if line.strip()]
    changed = [r["changed_fraction"] for r in records]
    seconds = [r["seconds"] for r in records]
    peak = peak_rss_mb()
    added = [c for c in task.classes if c not in current.prototypes.classes]
    report = AdaptReport(
        state="", steps=len(records), epochs=plan.epochs, images=len(task.pixels), skipped_unreadable=len(task.skipped),
        classes_updated=[c for c in task.classes if c not in added], classes_added=added, lr=plan.lr,
        final_loss=records[-1]["loss"] if records else None,
        changed_fraction_mean=float(np.mean(changed)) if changed else 0.0,
        changed_fraction_max=float(np.max(changed)) if changed else 0.0,
        step_seconds_median=float(np.median(seconds)) if seconds else None, peak_rss_mb=round(peak, 1),
        memory_budget_mb=prof.memory_budget_mb, drift_compensated=heads.drift_compensated,
        from_exemplars=heads.from_exemplars, replayed=len(data.pixels) - len(split.task_train),
        lda_moved=heads.lda_moved, exemplar_bytes=heads.memory.nbytes if plan.use_exemplars else 0,
        selection=selection, gate=gate_report, kept="adapted" if keep else "prototypes-only",
        kept_epochs=kept_epochs, resumed_from_step=resumed_from)
    trainable = kept_trainable if keep else start

    def write(tmp: Path) -> None:
        save_trainable(tmp / TRAINABLE, trainable)
        heads.prototypes.save_file(tmp / PROTOTYPES)
        heads.lda.save_file(tmp / LDA)
        if len(base_table):
            base_table.save_file(tmp / BASE_PROTOTYPES)
        if plan.use_exemplars and len(heads.memory.classes):
            heads.memory.save_file(tmp / EXEMPLARS)
        (tmp / STEP_LOG).write_bytes(run_dir.log_path.read_bytes())

    # samples_seen (the delta's merge weight): the images the committed state learned from: every
    # training sample of a kept adaptation, else the task's images its new prototypes came from.
    steps_kept = sum(1 for r in records if r["epoch"] <= kept_epochs)
    learned = steps_kept * plan.batch_size if keep else len(task.pixels)
    meta = {"data_dir": str(data_dir), "config": config, "report": report.to_json(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps_total": int(current.meta.get("steps_total", 0)) + steps_kept,
            "samples_seen": int(current.meta.get("samples_seen", 0)) + learned}
    report.state = commit_generation(bundle, write, meta)
    run_dir.remove()
    if prof.memory_budget_mb and peak > prof.memory_budget_mb:
        warnings.warn(f"peak memory {peak:.0f} MB exceeded the device profile's budget of "
                      f"{prof.memory_budget_mb} MB", stacklevel=2)
    return report


def _select_lr(plan: Plan, data: TrainSet, session: StepSession, start: dict[str, np.ndarray], scale: np.ndarray,
               manifest: mf.BundleManifest, heads: Heads, held: HeldOut, split: Split,
               moved_at: Any) -> dict[str, Any]:
    """Grid over lr x epochs, scored like the gate: held-out accuracy over old + task classes.

    Epoch 0 (no training) is a candidate, so the choice is never worse than prototypes only on the
    split. Ties go to fewer epochs, then the smaller lr: less movement, less forgetting.
    """
    delta0 = start[mf.DELTA_PARAM]
    trials = [{"lr": 0.0, "epochs": 0, "accuracy": score(heads, moved_at(None), held, delta0, plan.head)[0]}]
    for factor in SELECT_LR_FACTORS:
        sub = plan.sub(lr=plan.lr * factor)
        state = TrainState.fresh(plan.seed, start)
        for epoch in range(plan.epochs):
            train(sub.sub(epochs=epoch + 1), data, session, state, scale, manifest)
            trials.append({"lr": sub.lr, "epochs": epoch + 1,
                           "accuracy": score(heads, moved_at(state.delta), held, state.delta, plan.head)[0]})
    best = max(trials, key=lambda t: (t["accuracy"], -t["epochs"], -t["lr"]))
    return {"chosen": best, "trials": trials, "held_out_images": len(held)}
