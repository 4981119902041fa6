"""One adaptation's data, in one object: what ``edgecl adapt`` reads, splits and embeds before it trains.

An ``Episode`` owns the task's images and their fingerprints, the device's state as it was, the
exemplar memory, the split into training and held-out rows (the do-no-harm check and ``--select-lr``
judge on the held-out ones), the training set (task rows + replayed exemplars) and the embeddings
under the starting backbone. Everything after the loop asks it for the statistics' inputs under a
delta (``moved``), for the held-out images (``held_out``) and for the post-steps' result
(``post_steps``), so no step needs a closure over another step's locals.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl import classstats
from edgecl.errors import DataError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_bytes
from edgecl.formats.images import LoadedImages, load_image_folder
from edgecl.formats.prototypes import Prototypes, image_fingerprints
from edgecl.formats.weights import load_weights

from .heads import LdaHead
from .infer import create_runner, embed_and_score, state_lda
from .noharm import HeldOut, holdout_split
from .plan import Plan, check_replay_share
from .poststeps import MAX_EXEMPLARS_PER_CLASS, Heads, Moved, run_post_steps
from .state import DeviceState, OpenBundle, bundle_prototypes, load_current
from .trainloop import TrainSet


def replay_repeats(n_task: int, n_exemplars: int, share: float) -> int:
    """How many times to repeat the exemplars so they make up about ``share`` of the training data.

    A few exemplars per old class beside hundreds of new images barely register in the loss; repeating
    them (each repeat gets fresh augmentations) lets the old classes weigh in. share 0 = once.
    """
    check_replay_share(share)
    if n_exemplars == 0 or share == 0.0:
        return 1
    return max(1, int(round(share / (1.0 - share) * n_task / n_exemplars)))


@dataclass
class Split:
    """Which rows train and which are held out (the do-no-harm check, --select-lr); all rows train without one."""
    task_train: np.ndarray
    task_held: np.ndarray
    exemplar_train: dict[str, np.ndarray]   # class -> rows of memory.of_class(class)
    exemplar_held: dict[str, np.ndarray]

    @classmethod
    def everything(cls, n_task: int, exemplar_rows: dict[str, np.ndarray]) -> Split:
        return cls(np.arange(n_task), np.zeros(0, np.int64), exemplar_rows,
                   {c: rows[:0] for c, rows in exemplar_rows.items()})


@dataclass
class Episode:
    bundle: OpenBundle
    plan: Plan
    profile: DeviceProfile
    data_dir: Path
    task: LoadedImages                      # the task's decoded images (uint8 [N, H, W, 3]) and labels
    fingerprints: np.ndarray                # [N] image_fingerprints(task.pixels)
    current: DeviceState                    # the committed state this adaptation starts from
    memory: ExemplarMemory                  # exemplars of old classes (replay, drift, the held-out share)
    known: list[str]                        # old classes the memory holds exemplars of
    replay_names: list[str]                 # classes whose exemplars join the training data
    split: Split
    train_set: TrainSet
    start_heads: Heads                      # class statistics before this adaptation
    runner: Any                             # InferenceRunner: embeddings under any delta
    before: np.ndarray | None = None        # [N, D] task images under the starting backbone (set by embed_task)
    exemplars_before: dict[str, np.ndarray] = field(default_factory=dict)
    _held_cache: dict[bytes, np.ndarray] = field(default_factory=dict)

    # -- embeddings -------------------------------------------------------------------------------
    def embed(self, pixels: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return embed_and_score(self.runner, self.bundle, pixels, delta)[0]

    def embed_task(self, before: np.ndarray | None = None) -> None:
        """The task's images under the starting backbone (a resumed run passes what it stored)."""
        self.before = self.embed(self.task.pixels, self.current.delta) if before is None else before

    @property
    def judged(self) -> bool:
        """Whether anything is held out (the do-no-harm check and --select-lr need it)."""
        return bool(len(self.split.task_held))

    def held_out(self) -> HeldOut:
        """The held-out images (task rows + old classes' held-out exemplars), embedded once per delta."""
        pixels = np.concatenate([self.task.pixels[self.split.task_held]] +
                                [self.memory.of_class(c)[self.split.exemplar_held[c]] for c in self.known])
        names = ([self.task.classes[y] for y in self.task.labels[self.split.task_held]] +
                 [c for c in self.known for _ in self.split.exemplar_held[c]])

        def embeddings_of(delta: np.ndarray) -> np.ndarray:
            key = delta.tobytes()
            if key not in self._held_cache:
                self._held_cache.clear()   # one delta at a time: the gate scores them in turn
                self._held_cache[key] = self.embed(pixels, delta)
            return self._held_cache[key]

        old = np.concatenate([np.zeros(len(self.split.task_held), bool),
                              np.ones(len(names) - len(self.split.task_held), bool)])
        return HeldOut(embeddings_of, names, old)

    # -- the statistics' inputs under a delta -----------------------------------------------------
    def moved(self, delta: np.ndarray | None, training_rows_only: bool) -> Moved:
        """What ``delta`` (None: the backbone did not move) does to the embeddings of the training rows
        (the do-no-harm check builds its candidates from those) or of every task image (the commit)."""
        assert self.before is not None, "embed_task() first"
        if training_rows_only:
            rows, ex_rows = self.split.task_train, self.split.exemplar_train
        else:
            rows = np.arange(len(self.task.labels))
            ex_rows = {c: np.arange(len(self.memory.of_class(c))) for c in self.known}
        before = self.before[rows]
        after = before if delta is None else self.embed(self.task.pixels[rows], delta)
        ex_after = (self.exemplars_before if delta is None
                    else {c: self.embed(self.memory.of_class(c), delta) for c in self.known})
        plan = self.plan
        return Moved(trained=delta is not None, task_pixels=self.task.pixels[rows], task_labels=self.task.labels[rows],
                     task_fingerprints=self.fingerprints[rows], task_classes=list(self.task.classes),
                     before=before, after=after,
                     exemplars_before={c: self.exemplars_before[c][ex_rows[c]] for c in self.known},
                     exemplars_after={c: ex_after[c][ex_rows[c]] for c in self.known},
                     drift_sigma=plan.drift_sigma, drift_compensation=plan.drift_compensation,
                     use_exemplars=plan.use_exemplars,
                     exemplar_budget_bytes=self.profile.exemplar_budget_mb * 1024 * 1024)

    def post_steps(self, delta: np.ndarray | None) -> Heads:
        """The class statistics after this adaptation, on every task image, with the kept backbone."""
        return run_post_steps(self.start_heads, self.moved(delta, training_rows_only=False))

    def calibration(self, delta: np.ndarray | None) -> dict[str, Any] | None:
        """The unknown threshold and the heads' temperatures for the committed state (unknown.calibrate),
        fitted on the task's held-out images under the kept backbone, scored against statistics built on
        the training rows only, so no image counted by the statistics judges them. The committed statistics
        also count the held-out images, so the threshold is set on slightly farther statistics: the
        flagged share of known images errs low. None when nothing was held out (--no-gate)."""
        if not len(self.split.task_held):
            return None
        from .unknown import calibrate

        heads = run_post_steps(self.start_heads, self.moved(delta, training_rows_only=True))
        protos = heads.prototypes
        held = self.held_out()
        # Only the task's held-out images: the old classes' held-out exemplars are counted in their means
        # (the calibration set, an earlier task), and would make every known class look closer than it is.
        keep = [i for i, name in enumerate(held.names[:len(self.split.task_held)]) if name in protos.classes]
        if not keep:
            return None
        embeddings = held.embeddings_of(self.current.delta if delta is None else delta)[keep]
        labels = np.asarray([protos.classes.index(held.names[i]) for i in keep])
        return calibrate(embeddings, labels, protos.means, heads.lda, heads.lda.means_for(protos.classes, protos.means))

    def base_prototypes(self) -> Prototypes:
        """The state's base-space table after this task: each task class the bundle does not ship, its
        previous base-space mean merged by counts with this task's images under the bundle's own
        backbone, each image counted once (images the state already counts are skipped). The release
        check's frozen baseline, which only the device (holding the images) can compute. The task's
        embeddings under the start are that already when this adaptation started from the bundle's weights."""
        current, task = self.current, self.task
        table = (Prototypes.load_file(current.base_prototypes_path) if current.base_prototypes_path is not None
                 else Prototypes.empty(int(current.prototypes.means.shape[1])))
        shipped = set(bundle_prototypes(self.bundle).classes)
        new_rows: dict[str, np.ndarray] = {}
        for i, name in enumerate(task.classes):
            rows = np.flatnonzero(task.labels == i)
            rows = rows[~current.prototypes.seen_mask(name, self.fingerprints[rows])]
            if name not in shipped and rows.size:
                new_rows[name] = rows
        if not new_rows:
            return table
        base = (self.before if not np.any(current.delta) and self.before is not None
                else self.embed(task.pixels, np.zeros_like(current.delta)))
        for name, rows in new_rows.items():
            mean, count = base[rows].astype(np.float64).mean(0), int(rows.size)
            if name in table.classes:
                j = table.classes.index(name)
                mean, count = classstats.merge_by_counts([table.means[j], mean], [int(table.counts[j]), count])
            table.upsert(name, mean, count)
        return table

    def replayed_per_class(self) -> dict[str, int]:
        """Replayed samples per class: the training rows after the task's own (the exemplars, repeats counted)."""
        labels = self.train_set.labels[len(self.split.task_train):]
        counts = np.bincount(labels, minlength=len(self.train_set.classes))
        return {c: int(n) for c, n in zip(self.train_set.classes, counts.tolist(), strict=False) if n}

    def data_fingerprint(self) -> str:
        """Which files (relative names and sizes) the task came from: a resumed run must see the same."""
        root = self.data_dir
        # os.fsencode: a file name that is not valid UTF-8 (a camera's Latin-1 name) still hashes.
        names = [os.fsencode(p.relative_to(root) if p.is_relative_to(root) else p) + b":%d" % p.stat().st_size
                 for p in self.task.paths]
        return sha256_bytes(b"\n".join(names))

    def run_config(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        return {"parent": self.current.generation, "data": self.data_fingerprint(), "classes": self.task.classes,
                "plan": self.plan.fingerprint(), "replay": self.replay_names}


# -- building an episode ---------------------------------------------------------------------------

def open_episode(bundle: OpenBundle, data_dir: Path, plan: Plan, profile: DeviceProfile) -> Episode:
    """Read the task, the state and the memory; split; build the training set; open the inference session."""
    task = _load_task(bundle, data_dir)
    current = load_current(bundle)
    memory = with_fleet_exemplars(_load_memory(current, bundle, plan.use_exemplars), bundle, current, profile,
                                  plan.use_exemplars)
    known = [c for c in memory.classes if c in current.prototypes.classes and len(memory.of_class(c))]
    # Replay every class the memory holds: old classes, and a task class seen before (its earlier
    # camera's exemplars: B6 measured +1.5 points on the last camera, docs/benchmarks.md#b6).
    replay_names = list(known) if plan.replay and plan.epochs > 0 else []
    fingerprints = image_fingerprints(task.pixels)  # once: the split and every post-step run use them
    # Held out: for the do-no-harm check and --select-lr, and with no training (--epochs 0) for the
    # unknown threshold's calibration alone (the statistics still count every image).
    hold = (plan.epochs > 0 and (plan.gate or plan.select_lr)) or plan.epochs == 0
    split = _split(task, memory, known, plan, hold, current.prototypes, fingerprints)
    if hold and plan.epochs > 0 and not len(split.task_held):
        if plan.select_lr:
            raise DataError("--select-lr needs at least two images per class", "add images or drop --select-lr")
        warnings.warn("too few images the class statistics do not already count to hold any out: the do-no-harm "
                      "check is off for this run (show the device new images of the task's classes to judge)",
                      stacklevel=3)
        split = _split(task, memory, known, plan, False)
    # A state's own LDA statistics, else the fleet's its bundle ships, else none yet.
    lda = state_lda(bundle, current) or LdaHead(int(bundle.manifest.embedding_dim))
    episode = Episode(bundle=bundle, plan=plan, profile=profile, data_dir=data_dir, task=task,
                      fingerprints=fingerprints, current=current, memory=memory, known=known,
                      replay_names=replay_names, split=split,
                      train_set=_train_set(task, memory, split, replay_names, plan),
                      start_heads=Heads(current.prototypes, lda, memory), runner=create_runner(bundle, profile))
    episode.exemplars_before = {c: episode.embed(memory.of_class(c), current.delta) for c in known}
    return episode


def start_trainable(episode: Episode) -> dict[str, np.ndarray]:
    """The trainable values the loop starts from: the state's, else the bundle's head and a zero delta."""
    current, bundle = episode.current, episode.bundle
    if current.trainable and mf.PROJ_WEIGHT in current.trainable:
        return current.trainable
    head = load_weights(bundle.path(mf.HEAD_INIT), [mf.PROJ_WEIGHT, mf.PROJ_BIAS])
    return {mf.DELTA_PARAM: current.delta, **head}


def _load_task(bundle: OpenBundle, data_dir: Path) -> LoadedImages:
    m = bundle.manifest
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipped ")  # the skip count is reported once, below and in the report
        data = load_image_folder(data_dir, m.input_size, m.interpolation)
    if data.skipped:
        warnings.warn(f"skipped {len(data.skipped)} unreadable image(s) in {data_dir}, e.g. {data.skipped[0][0]}",
                      stacklevel=4)
    return data


def _load_memory(current: DeviceState, bundle: OpenBundle, use: bool) -> ExemplarMemory:
    if use and current.exemplars_path:
        return ExemplarMemory.load_file(current.exemplars_path)
    if use and bundle.path(mf.EXEMPLARS).exists():
        # First adaptation: start from the calibration exemplars the host shipped in the bundle.
        return ExemplarMemory.load_file(bundle.path(mf.EXEMPLARS))
    h, w = bundle.manifest.input_size
    return ExemplarMemory.empty((int(h), int(w)))


def with_fleet_exemplars(memory: ExemplarMemory, bundle: OpenBundle, current: DeviceState, profile: DeviceProfile,
                         use: bool) -> ExemplarMemory:
    """The memory adapt replays from, with the bundle's exemplars of the classes it lacks that this
    device knows (a released bundle ships the fleet's: devices that share exemplars, docs/server.md),
    so every class of the fleet is replayed; trimmed to the profile's exemplar budget when over it
    (every class to its share, keeping its first images: the memory's own rule)."""
    path = bundle.path(mf.EXEMPLARS)
    if not use or not path.exists():
        return memory
    shipped = ExemplarMemory.load_file(path)
    take = [c for c in shipped.classes if c not in memory.classes and c in current.prototypes.classes]
    if take:
        memory = ExemplarMemory(list(memory.classes) + take,
                                np.concatenate([memory.pixels] + [shipped.of_class(c) for c in take]).astype(np.uint8),
                                np.concatenate([memory.labels] + [np.full(len(shipped.of_class(c)), len(memory.classes) + j,
                                                                          np.int64) for j, c in enumerate(take)]))
    budget = profile.exemplar_budget_mb * 1024 * 1024
    if memory.nbytes > budget:
        memory = memory.update({}, budget, MAX_EXEMPLARS_PER_CLASS)
    return memory


def _split(task: LoadedImages, memory: ExemplarMemory, classes: list[str], plan: Plan, hold: bool,
           counted: Prototypes | None = None, fingerprints: np.ndarray | None = None) -> Split:
    all_rows = {c: np.arange(len(memory.of_class(c))) for c in classes}
    if not hold:
        return Split.everything(len(task.labels), all_rows)
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
    train_rows = np.sort(np.concatenate([candidates[train_rows], np.flatnonzero(~fresh)]))
    held_rows = candidates[held_rows]
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

