"""`edgecl adapt`: drop-gated sparse tuning on the device, then the SimpleCIL prototypes.

Reads top to bottom like a training script:
1. open the bundle and the current device state, load the task's images; with exemplars stored,
   add the old classes' exemplars to the training images (replay, repeated to --replay-share);
2. embed the task images with the current backbone (kept for drift compensation);
3. train: per batch, two augmented views -> ORT forward+backward -> numpy gated SGD on the delta,
   dense SGD on the projection head; checkpoint every N steps; log every step;
4. embed again; prototypes of the task's classes from the new embeddings; old classes moved by
   their exemplars' drift if stored, else by semantic drift compensation; the LDA head's pooled
   covariance gets the task's deviations from its class means;
5. commit the new state atomically (the old one stays for `edgecl rollback`).

Determinism: two numpy Generators from SeedSequence(seed) drive everything random (one for the
shuffle and augmentations, one for the drop gate); their states, the epoch's permutation and the
step counters go into every checkpoint, so `--resume` replays the exact stream.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DataError, DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_bytes
from edgecl.formats.images import LoadedImages, load_image_folder, two_views
from edgecl.formats.prototypes import Prototypes

from . import drift as sdc
from .heads import LdaHead, fit_linear_drift
from .infer import create_runner, embed_and_score, resolve_profile
from .state import (
    EXEMPLARS,
    LDA,
    PROTOTYPES,
    STEP_LOG,
    TRAINABLE,
    Bundle,
    RunDir,
    check_resumable,
    commit_generation,
    load_current,
    load_trainable,
    open_bundle,
    save_trainable,
)
from .update import cap_gate, draw_gate, overlap_scale, sgd_step, sparse_sgd_step

TRAINABLE_NAMES = (mf.DELTA_PARAM, mf.PROJ_WEIGHT, mf.PROJ_BIAS)
MAX_EXEMPLARS_PER_CLASS = 20          # cap even when the byte budget allows more
SELECT_HOLDOUT_FRACTION = 0.2         # share of each class held out by --select-lr
SELECT_LR_FACTORS = (0.1, 1.0, 10.0)  # --select-lr grid around the chosen lr


@dataclass
class AdaptOptions:
    epochs: int | None = None             # None = manifest.epochs; 0 = prototypes only
    lr: float | None = None               # backbone (delta) lr; None = manifest.lr_backbone
    lr_head: float | None = None          # projection head lr; None = manifest.lr_head
    batch_size: int | None = None         # images per step (2x views); None = profile's, else manifest's
    seed: int | None = None               # None = manifest.seed
    checkpoint_every: int = 50            # steps between checkpoints (and at each epoch end, and the end)
    drift_compensation: bool = True       # move old prototypes by SDC (drift.py)
    drift_sigma: float | None = None      # None = data-driven (drift.default_sigma)
    exemplars: bool | None = None         # None = profile.store_images
    replay: bool = True                   # with exemplars: mix old classes' exemplars into the training data
    replay_share: float = 0.5             # repeat them to about this share of the data (0 = each once)
    select_lr: bool = False               # choose lr and epochs on a held-out split first
    max_step_fraction: float = 0.005      # never let more than this share of ALL weights change in a step
                                          # (METHOD.md step 3: "under 0.5%"); 0 = no cap
    resume: bool = False                  # continue the interrupted run
    progress: bool = True                 # tqdm bar on stderr


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
    resumed_from_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Run:
    """Everything the loop needs that does not change during it."""
    bundle: Bundle
    pixels: np.ndarray                    # uint8 [N, H, W, 3]
    labels: np.ndarray                    # int64 [N]
    epochs: int
    lr: float
    lr_head: float
    batch_size: int
    scale: np.ndarray                     # overlap gradient scale [K]
    max_gated: int = -1                   # per-step cap on open gates (-1 = none)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _load_task(bundle: Bundle, data_dir: str | Path) -> LoadedImages:
    m = bundle.manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip count is reported once, below and in the report
        data = load_image_folder(data_dir, m.input_size, m.interpolation)
    if data.skipped:
        warnings.warn(f"skipped {len(data.skipped)} unreadable image(s) in {data_dir}, e.g. {data.skipped[0][0]}",
                      stacklevel=3)
    return data


def _fingerprint(data: LoadedImages, root: Path) -> str:
    names = [f"{p.relative_to(root) if p.is_relative_to(root) else p}:{p.stat().st_size}" for p in data.paths]
    return sha256_bytes("\n".join(names).encode())


def _new_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    data_seq, gate_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.Generator(np.random.PCG64(data_seq)), np.random.Generator(np.random.PCG64(gate_seq))


def _rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _open_session(bundle: Bundle, profile: DeviceProfile, trainable: dict[str, np.ndarray]):  # noqa: ANN202
    from .ort import TrainingSession  # the one module touching onnxruntime-training
    session = TrainingSession(bundle.path(mf.TRAINING_MODEL), bundle.path(mf.EVAL_MODEL),
                              bundle.path(mf.CHECKPOINT), threads=profile.threads,
                              provider=profile.execution_provider)
    for name, value in trainable.items():
        session.set_param(name, value)
    return session


def _train(run: _Run, session, delta: np.ndarray, data_rng: np.random.Generator,  # noqa: ANN001, C901
           gate_rng: np.random.Generator, position: dict[str, Any], *, epochs: int | None = None,
           log=None, checkpoint=None, checkpoint_every: int = 0, bar=None) -> np.ndarray:  # noqa: ANN001
    """Run the steps from ``position`` (epoch, batch, step, perm) to the end of ``epochs``; return the delta."""
    m = run.bundle.manifest
    n, batch_size = len(run.pixels), run.batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    first_epoch, batch, step = position["epoch"], position["batch"], position["step"]
    perm = None if position.get("perm") is None else np.asarray(position["perm"], np.int64)
    for epoch in range(first_epoch, run.epochs if epochs is None else epochs):
        if perm is None:
            perm = data_rng.permutation(n)
        while batch < steps_per_epoch:
            t0 = time.perf_counter()
            rows = perm[batch * batch_size:(batch + 1) * batch_size]
            views = two_views(run.pixels[rows], data_rng, m.mean, m.std, m.interpolation)
            labels = np.concatenate([run.labels[rows], run.labels[rows]])
            loss = session.train_step(views, labels)
            # The drop gate: a fresh Bernoulli draw per selected element (METHOD.md step 3).
            gate = cap_gate(draw_gate(gate_rng, delta.size, m.drop_rate), run.max_gated, gate_rng)
            result = sparse_sgd_step(delta, session.grad(mf.DELTA_PARAM), gate, run.scale, run.lr, m.weight_decay)
            delta = result.delta
            session.set_param(mf.DELTA_PARAM, delta)
            for name in (mf.PROJ_WEIGHT, mf.PROJ_BIAS):  # the head is not deployed: dense SGD
                session.set_param(name, sgd_step(session.get_param(name), session.grad(name), run.lr_head))
            session.lazy_reset_grad()
            batch += 1
            step += 1
            if not math.isfinite(loss):
                raise DeviceError(f"the loss became {loss} at step {step}",
                                  "lower --lr (the state before this adaptation is unchanged)")
            if log is not None:
                log({"step": step, "epoch": epoch, "loss": loss, "gated": result.gated, "changed": result.changed,
                     "changed_fraction": result.changed / m.total_params,
                     "seconds": round(time.perf_counter() - t0, 6)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if checkpoint is not None and batch == steps_per_epoch:
                checkpoint(step, delta, {"epoch": epoch + 1, "batch": 0, "step": step, "perm": None})
            elif checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step, delta, {"epoch": epoch, "batch": batch, "step": step, "perm": perm.tolist()})
        batch, perm = 0, None
    return delta


def _class_means(embeddings: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    return {name: (embeddings[labels == i].mean(axis=0), int((labels == i).sum()))
            for i, name in enumerate(classes) if (labels == i).any()}


def _holdout_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out ~20% (at least one image when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(SELECT_HOLDOUT_FRACTION * len(rows))) if len(rows) >= 2 else 0
        k = max(k, 1) if len(rows) >= 2 else 0
        held.extend(rows[:k])
        train.extend(rows[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))


def _select_lr(run: _Run, profile: DeviceProfile, start: dict[str, np.ndarray], delta0: np.ndarray,
               old: Prototypes, classes: list[str], seed: int, runner) -> dict[str, Any]:  # noqa: ANN001
    """Grid over lr x epochs on a held-out split: held-out prototype accuracy over old + task classes.

    Epoch 0 (no training) is a candidate, so the choice is never worse than frozen on the split.
    Ties go to fewer epochs, then the smaller lr: less movement, less forgetting.
    """
    train_rows, held_rows = _holdout_split(run.labels, seed)
    if not len(held_rows) or not len(train_rows):
        raise DataError("--select-lr needs at least two images per class", "add images or drop --select-lr")
    old_names = [c for c in old.classes if c not in classes]
    old_means = old.means[[old.classes.index(c) for c in old_names]] if old_names else None

    def accuracy(delta: np.ndarray) -> float:
        emb_train, _ = embed_and_score(runner, run.bundle, run.pixels[train_rows], delta)
        means = _class_means(emb_train, run.labels[train_rows], classes)
        names = [c for c in classes if c in means] + old_names
        table = np.stack([means[c][0] for c in classes if c in means]
                         + ([] if old_means is None else list(old_means))).astype(np.float32)
        _, logits = embed_and_score(runner, run.bundle, run.pixels[held_rows], delta, table)
        predicted = [names[j] for j in logits.argmax(axis=1)]
        return float(np.mean([p == classes[y] for p, y in zip(predicted, run.labels[held_rows], strict=True)]))

    trials = [{"lr": 0.0, "epochs": 0, "accuracy": accuracy(delta0)}]
    sub = _Run(run.bundle, run.pixels[train_rows], run.labels[train_rows], run.epochs, run.lr, run.lr_head,
               run.batch_size, run.scale, run.max_gated)
    for factor in SELECT_LR_FACTORS:
        sub.lr = run.lr * factor
        session = _open_session(run.bundle, profile, start)
        data_rng, gate_rng = _new_rngs(seed)
        delta = delta0
        for epoch in range(run.epochs):
            delta = _train(sub, session, delta, data_rng, gate_rng, {"epoch": epoch, "batch": 0, "step": 0},
                           epochs=epoch + 1)
            trials.append({"lr": sub.lr, "epochs": epoch + 1, "accuracy": accuracy(delta)})
    best = max(trials, key=lambda t: (t["accuracy"], -t["epochs"], -t["lr"]))
    return {"chosen": best, "trials": trials, "held_out_images": int(len(held_rows))}


def replay_repeats(n_task: int, n_exemplars: int, share: float) -> int:
    """How many times to repeat the exemplars so they make up about ``share`` of the training data.

    A few exemplars per old class beside hundreds of new images barely register in the loss; repeating
    them (each repeat gets fresh augmentations) lets the old classes weigh in. share 0 = once.
    """
    if not 0.0 <= share < 1.0:
        raise DeviceError(f"the replay share must be in [0, 1), got {share}", "pass e.g. --replay-share 0.5")
    if n_exemplars == 0 or share == 0.0:
        return 1
    return max(1, int(round(share / (1.0 - share) * n_task / n_exemplars)))


def _load_memory(current, bundle: Bundle) -> ExemplarMemory:  # noqa: ANN001
    if current.exemplars_path:
        return ExemplarMemory.load_file(current.exemplars_path)
    if bundle.path(mf.EXEMPLARS).exists():
        # First adaptation: start from the calibration exemplars the host shipped in the bundle.
        return ExemplarMemory.load_file(bundle.path(mf.EXEMPLARS))
    return ExemplarMemory.empty(tuple(bundle.manifest.input_size))


def adapt(bundle_dir: str | Path, data_dir: str | Path, options: AdaptOptions | None = None,
          profile: str | Path | DeviceProfile | None = None) -> AdaptReport:
    opts = options or AdaptOptions()
    prof = resolve_profile(profile)
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    from .ort import check_provider
    check_provider(prof.execution_provider)  # before any work: a clear error, nothing written

    run_dir = RunDir(bundle)
    if opts.resume and not run_dir.exists():
        raise DeviceError("there is no interrupted adaptation to resume", "run `edgecl adapt` without --resume")

    # 1. inputs and the state we start from
    data = _load_task(bundle, data_dir)
    current = load_current(bundle)
    epochs = m.epochs if opts.epochs is None else int(opts.epochs)
    if epochs < 0:
        raise DeviceError(f"--epochs must be >= 0, got {epochs}", "pass 0 to only compute prototypes")
    batch_size = opts.batch_size or (prof.batch_size if profile is not None else m.batch_size)
    seed = m.seed if opts.seed is None else int(opts.seed)
    use_exemplars = prof.store_images if opts.exemplars is None else (opts.exemplars and prof.store_images)
    run = _Run(bundle, data.pixels, data.labels, epochs, m.lr_backbone if opts.lr is None else float(opts.lr),
               m.lr_head if opts.lr_head is None else float(opts.lr_head), int(batch_size),
               overlap_scale(bundle.mask.overlap_vector(), m.overlap_decay))
    if opts.max_step_fraction > 0:
        run.max_gated = int(math.floor(opts.max_step_fraction * m.total_params))
        expected = bundle.mask.total_selected * (1.0 - m.drop_rate)
        if expected > 1.05 * run.max_gated:
            warnings.warn(f"the per-step budget ({100 * opts.max_step_fraction:g}% of all weights) is below the "
                          f"expected open gates ({expected / m.total_params:.3%}): the effective drop rate is "
                          f"{1 - run.max_gated / max(bundle.mask.total_selected, 1):.3f}", stacklevel=2)
    memory = _load_memory(current, bundle)
    replay_names = ([c for c in memory.classes if c not in data.classes and len(memory.of_class(c))]
                    if use_exemplars and opts.replay and epochs > 0 else [])
    if replay_names:
        # Replay: the old classes' exemplars join the task's images (labels after the task's), so the
        # contrastive loss also pushes the new classes away from the old ones instead of only apart
        # from each other; the backbone then moves where it helps every class seen so far.
        replay_pixels = [memory.of_class(c) for c in replay_names]
        k = replay_repeats(len(data.pixels), sum(len(px) for px in replay_pixels), opts.replay_share)
        run.pixels = np.concatenate([data.pixels, *[px for px in replay_pixels for _ in range(k)]])
        run.labels = np.concatenate([data.labels, *[np.full(len(px), len(data.classes) + j, data.labels.dtype)
                                                    for j, px in enumerate(replay_pixels) for _ in range(k)]])
    train_classes = data.classes + replay_names
    start_trainable = current.trainable or {}
    config = {"parent": current.generation, "data": _fingerprint(data, Path(data_dir)), "classes": data.classes,
              "epochs": epochs, "lr": run.lr, "lr_head": run.lr_head, "batch_size": run.batch_size, "seed": seed,
              "select_lr": opts.select_lr, "drift_compensation": opts.drift_compensation,
              "exemplars": bool(use_exemplars), "replay": replay_names, "replay_share": opts.replay_share,
              "max_gated": run.max_gated}
    runner = create_runner(bundle, prof)

    # 2. a fresh run embeds the task before training; a resumed one reads what it stored
    if opts.resume:
        check_resumable(run_dir, config, current.generation)
        config = run_dir.config()
        before = run_dir.start_arrays()["before"]
        run.lr, run.epochs = config["run_lr"], config["run_epochs"]
        selection = config.get("selection")
    else:
        if run_dir.exists():
            warnings.warn("discarding an interrupted adaptation (pass --resume to continue it)", stacklevel=2)
        before, _ = embed_and_score(runner, bundle, data.pixels, current.delta)
        selection = None
        if opts.select_lr and epochs > 0:
            selection = _select_lr(run, prof, start_trainable, current.delta, current.prototypes, train_classes,
                                   seed, runner)
            run.lr, run.epochs = selection["chosen"]["lr"], selection["chosen"]["epochs"]
        config = {**config, "run_lr": run.lr, "run_epochs": run.epochs, "selection": selection}
        run_dir.start(config, {"before": before})

    # 3. train
    session = _open_session(bundle, prof, start_trainable)
    position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "perm": None}
    data_rng, gate_rng = _new_rngs(seed)
    delta = current.delta.copy()
    resumed_from = None
    latest = run_dir.latest() if opts.resume else None
    if latest is not None:
        ckpt_dir, resume = latest
        trainable = load_trainable(ckpt_dir / TRAINABLE, bundle.mask.total_selected)
        for name, value in trainable.items():
            session.set_param(name, value)
        delta = trainable[mf.DELTA_PARAM].astype(np.float32)
        data_rng, gate_rng = _rng_from_state(resume["data_rng"]), _rng_from_state(resume["gate_rng"])
        position = resume["position"]
        resumed_from = position["step"]
    run_dir.truncate_log(position["step"])

    def save_checkpoint(step: int, delta_now: np.ndarray, pos: dict[str, Any]) -> None:
        def write(tmp: Path) -> None:
            save_trainable(tmp / TRAINABLE, {n: session.get_param(n) for n in TRAINABLE_NAMES})
        run_dir.save_checkpoint(step, write, {"position": pos, "data_rng": data_rng.bit_generator.state,
                                              "gate_rng": gate_rng.bit_generator.state})

    steps_total = run.epochs * math.ceil(len(run.pixels) / run.batch_size)
    bar = None
    if opts.progress and steps_total:
        from tqdm import tqdm
        bar = tqdm(total=steps_total, initial=position["step"], desc="adapt", unit="step", leave=False)
    with open(run_dir.log_path, "a") as log_file:
        def log(record: dict[str, Any]) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        try:
            delta = _train(run, session, delta, data_rng, gate_rng, position, log=log,
                           checkpoint=save_checkpoint, checkpoint_every=opts.checkpoint_every, bar=bar)
        finally:
            if bar is not None:
                bar.close()

    # 4. prototypes: task classes from the adapted backbone, old classes kept valid
    trained = bool(np.any(delta != current.delta))
    after = embed_and_score(runner, bundle, data.pixels, delta)[0] if trained else before
    prototypes = Prototypes(list(current.prototypes.classes), current.prototypes.means.copy(),
                            current.prototypes.counts.copy())
    old_names = [c for c in prototypes.classes if c not in data.classes]
    from_exemplars, compensated = [], []
    drift_before, drift_after = [before], [after]  # what the LDA head's drift map is fitted on
    if trained:
        for name in old_names:
            stored = memory.of_class(name) if use_exemplars else memory.pixels[:0]
            if len(stored):
                # The class's own drift, measured on its exemplars, moves the prototype that was
                # computed from all of its images (a mean over a few exemplars alone is noisier).
                ex_after = embed_and_score(runner, bundle, stored, delta)[0]
                ex_before = embed_and_score(runner, bundle, stored, current.delta)[0]
                row = prototypes.classes.index(name)
                prototypes.means[row] = prototypes.means[row] + ex_after.mean(axis=0) - ex_before.mean(axis=0)
                from_exemplars.append(name)
                drift_before.append(ex_before)
                drift_after.append(ex_after)
        drifting = [c for c in old_names if c not in from_exemplars]
        if opts.drift_compensation and drifting:
            rows = [prototypes.classes.index(c) for c in drifting]
            sigma = opts.drift_sigma or sdc.default_sigma(before, data.labels)
            prototypes.means[rows] = sdc.compensate(prototypes.means[rows], before, after, sigma)
            compensated = drifting
    # The LDA head: deviations of the task's images from their class means, pooled with every earlier
    # task's, and its own class means. The old part cannot be recomputed (its images are gone), so when
    # the backbone moved it is first carried through the affine drift map fitted on the task's images
    # and the exemplars embedded before and after (heads.fit_linear_drift); a class the head has no
    # mean of yet starts from its prototype before this adaptation.
    lda = (LdaHead.load_file(current.lda_path) if current.lda_path is not None
           else LdaHead(int(m.embedding_dim)))
    lda_moved = bool(trained and len(after))
    if lda_moved:
        for i, name in enumerate(current.prototypes.classes):
            lda.means.setdefault(name, current.prototypes.means[i].astype(np.float64))
        lda.move(fit_linear_drift(np.concatenate(drift_before), np.concatenate(drift_after)))
    if len(after):
        lda.add(after, data.labels)
        for name, (mean, _count) in _class_means(after, data.labels, data.classes).items():
            lda.means[name] = mean.astype(np.float64)
    added = [c for c in data.classes if c not in prototypes.classes]
    for name, (mean, count) in _class_means(after, data.labels, data.classes).items():
        prototypes.upsert(name, mean, count)
    if use_exemplars:
        per_class = {name: (data.pixels[data.labels == i], after[data.labels == i])
                     for i, name in enumerate(data.classes)}
        memory = memory.update(per_class, prof.exemplar_budget_mb * 1024 * 1024, MAX_EXEMPLARS_PER_CLASS)

    # 5. commit: a new generation, then HEAD; the previous state stays for rollback
    log_records = [json.loads(line) for line in run_dir.log_path.read_text().splitlines() if line.strip()]
    changed = [r["changed_fraction"] for r in log_records]
    seconds = [r["seconds"] for r in log_records]
    peak = peak_rss_mb()
    report = AdaptReport(
        state="", steps=len(log_records), epochs=run.epochs, images=len(data.pixels),
        skipped_unreadable=len(data.skipped), classes_updated=[c for c in data.classes if c not in added],
        classes_added=added, lr=run.lr, final_loss=log_records[-1]["loss"] if log_records else None,
        changed_fraction_mean=float(np.mean(changed)) if changed else 0.0,
        changed_fraction_max=float(np.max(changed)) if changed else 0.0,
        step_seconds_median=float(np.median(seconds)) if seconds else None, peak_rss_mb=round(peak, 1),
        memory_budget_mb=prof.memory_budget_mb, drift_compensated=compensated, from_exemplars=from_exemplars,
        exemplar_bytes=memory.nbytes if use_exemplars else 0, replayed=len(run.pixels) - len(data.pixels),
        lda_moved=lda_moved,
        selection=selection, resumed_from_step=resumed_from)

    def write(tmp: Path) -> None:
        save_trainable(tmp / TRAINABLE, {n: session.get_param(n) for n in TRAINABLE_NAMES})
        prototypes.save_file(tmp / PROTOTYPES)
        lda.save_file(tmp / LDA)
        if use_exemplars and len(memory.classes):
            memory.save_file(tmp / EXEMPLARS)
        (tmp / STEP_LOG).write_bytes(run_dir.log_path.read_bytes())

    meta = {"data_dir": str(data_dir), "config": config, "report": report.to_json(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps_total": int(current.meta.get("steps_total", 0)) + report.steps,
            "samples_seen": int(current.meta.get("samples_seen", 0)) + report.steps * run.batch_size}
    report.state = commit_generation(bundle, write, meta)
    run_dir.remove()
    if prof.memory_budget_mb and peak > prof.memory_budget_mb:
        warnings.warn(f"peak memory {peak:.0f} MB exceeded the device profile's budget of "
                      f"{prof.memory_budget_mb} MB", stacklevel=2)
    return report
