"""`edgecl adapt`: drop-gated sparse tuning on the device, then the class statistics, then commit.

Reads top to bottom, as ``run_adaptation`` does:
1. plan      : options + device profile + bundle defaults -> one frozen Plan (plan.py);
2. episode   : the task's images, the current state, the exemplar memory, the held-out split and the
               training set, in one object (episode.py);
3. state     : a fresh TrainState, or the interrupted run's last checkpoint (--resume); --select-lr
               picks lr and epochs first (noharm.py);
4. train     : trainloop.train (step graph on plain onnxruntime, numpy drop gate + sparse SGD);
5. judge     : the do-no-harm check: adapted vs prototypes-only on the held-out images (noharm.py);
6. post-steps: every class's statistics under the kept backbone (poststeps.py, edgecl.classstats),
               and the unknown threshold and temperatures calibrated on the held-out images (unknown.py);
7. commit    : a new generation, atomically; the previous state stays for `edgecl rollback` (state.py).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.config import DeviceProfile
from edgecl.progress import phase, progress_bar

from .episode import Episode, open_episode, replay_repeats, start_trainable
from .infer import resolve_profile
from .noharm import Verdict, guard_precheck, judge, select_lr
from .ort import StepSession, check_provider
from .plan import AdaptOptions, Plan, resolve_plan
from .poststeps import Heads
from .state import RunDir, bundle_lock, check_resumable, commit_adaptation, open_bundle
from .trainloop import TrainState, steps_per_epoch, train
from .update import overlap_scale

__all__ = ["AdaptOptions", "AdaptReport", "adapt", "replay_repeats"]


@dataclass
class AdaptReport:
    state: str                            # the committed generation
    steps: int                            # training steps run (every epoch, also those the check threw away)
    epochs: int
    images: int
    skipped_unreadable: int
    classes_updated: list[str]
    classes_added: list[str]
    lr: float
    final_loss: float | None              # the loss at the end of the KEPT epoch (None: nothing kept)
    changed_fraction_mean: float          # changed delta entries / all model weights, mean over steps
    changed_fraction_max: float
    step_seconds_median: float | None
    peak_rss_mb: float
    memory_budget_mb: int
    drift_compensated: list[str] = field(default_factory=list)
    from_exemplars: list[str] = field(default_factory=list)
    replayed: int = 0                     # replayed samples: exemplar images of old classes in the training data
                                          # (each exemplar repeated replay_repeats times), not exemplars stored
    replayed_classes: dict[str, int] = field(default_factory=dict)  # class -> its replayed samples (the fleet's too)
    exemplars_stored: int = 0             # exemplar images the committed memory holds
    lda_moved: bool = False               # the LDA head's statistics were carried through the drift map
    exemplar_bytes: int = 0
    selection: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None    # the do-no-harm check: held-out accuracy, adapted vs prototypes only
    kept: str = "adapted"                 # "adapted" | "prototypes-only" (no training, or the check refused it)
    kept_epochs: int = 0                  # the epochs of training the committed state holds (0: none kept)
    resumed_from_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def adapt(bundle_dir: str | Path, data_dir: str | Path, options: AdaptOptions | None = None,
          profile: str | Path | DeviceProfile | None = None) -> AdaptReport:
    opts = options or AdaptOptions()
    bundle = open_bundle(bundle_dir)
    prof = resolve_profile(profile, bundle)  # --device > the bundle's export profile > built-in default
    check_provider(prof.execution_provider)  # before any work: a clear error, nothing written
    with bundle_lock(bundle, "adapt"):
        plan = resolve_plan(opts, prof, bundle.manifest, bundle.mask.total_selected)
        run_dir = RunDir(bundle)
        if opts.resume and not run_dir.exists():
            raise DeviceError("there is no interrupted adaptation to resume", "run `edgecl adapt` without --resume")
        phase("reading the images and embedding the task under the current backbone", plan.progress)
        return run_adaptation(open_episode(bundle, Path(data_dir), plan, prof), run_dir, opts.resume)


def run_adaptation(episode: Episode, run_dir: RunDir, resume: bool) -> AdaptReport:
    plan, state, selection = prepare_run(episode, run_dir, resume)
    resumed_from = state.step if resume and state.step else None
    # --max-old-drop with too few held-out old images to ever pass: refused before training, not after it
    verdict = guard_precheck(episode, plan)
    if verdict is None:
        records = train_episode(episode, plan, state, run_dir)
        phase("the do-no-harm check on the held-out images", plan.progress)
        verdict = judge(episode, plan, state, run_dir)
    else:
        records = []
        run_dir.log_path.touch()  # the generation's (empty) step log
    phase("class statistics under the kept backbone", plan.progress)
    heads = episode.post_steps(verdict.kept_delta)
    heads.lda.calibration = episode.calibration(verdict.kept_delta)
    base_table = episode.base_prototypes()
    report = make_report(episode, plan, verdict, heads, records, selection, resumed_from)
    kept_steps = sum(1 for r in records if r["epoch"] <= verdict.kept_epochs) if verdict.keep else 0
    report.state = commit_adaptation(
        episode.bundle, run_dir, verdict.trainable if verdict.keep else start_trainable(episode),
        heads.prototypes, heads.lda, heads.memory if plan.use_exemplars else None, base_table,
        commit_meta(episode, plan, report, kept_steps, selection))
    if episode.profile.memory_budget_mb and report.peak_rss_mb > episode.profile.memory_budget_mb:
        warnings.warn(f"peak memory {report.peak_rss_mb:.0f} MB exceeded the device profile's budget of "
                      f"{episode.profile.memory_budget_mb} MB", stacklevel=2)
    return report


# -- 3. state ---------------------------------------------------------------------------------------

def prepare_run(episode: Episode, run_dir: RunDir, resume: bool) -> tuple[Plan, TrainState, dict[str, Any] | None]:
    """The plan this run trains with (--select-lr or the interrupted run may change lr and epochs) and
    the training state it starts from. A fresh run embeds the task first; a resumed one reads what it stored."""
    plan, config = episode.plan, episode.run_config()
    start = start_trainable(episode)
    if resume:
        check_resumable(run_dir, config, episode.current.generation)
        saved = run_dir.config()
        episode.embed_task(run_dir.start_arrays()["before"])
        plan = plan.sub(lr=saved["run_lr"], epochs=saved["run_epochs"])
        selection = saved.get("selection")
        latest = run_dir.latest()
        state = (TrainState.load(latest[0], latest[1], episode.bundle.mask.total_selected) if latest is not None
                 else TrainState.fresh(plan.seed, start))
    else:
        if run_dir.exists():
            warnings.warn("discarding an interrupted adaptation (pass --resume to continue it)", stacklevel=4)
        episode.embed_task()
        selection = None
        if plan.select_lr:
            selection = select_lr(episode, plan, step_session(episode), start, _overlap(episode, plan))
            plan = plan.sub(lr=selection["chosen"]["lr"], epochs=selection["chosen"]["epochs"])
        assert episode.before is not None
        run_dir.start({**config, "run_lr": plan.lr, "run_epochs": plan.epochs, "selection": selection},
                      {"before": episode.before})
        state = TrainState.fresh(plan.seed, start)
    run_dir.truncate_log(state.step)
    return plan, state, selection


def step_session(episode: Episode) -> StepSession:
    return StepSession(episode.bundle.path(mf.TRAIN_STEP), threads=episode.profile.threads,
                       provider=episode.profile.execution_provider)


def _overlap(episode: Episode, plan: Plan) -> np.ndarray:
    return overlap_scale(episode.bundle.mask.overlap_vector(), plan.overlap_decay)


# -- 4. train ---------------------------------------------------------------------------------------

def train_episode(episode: Episode, plan: Plan, state: TrainState, run_dir: RunDir) -> list[dict[str, Any]]:
    """Run the loop to the plan's end; returns every step's log record (this run's and a resumed one's)."""
    judged = plan.gate and episode.judged
    if judged:
        episode.held_out().embeddings_of(episode.current.delta)  # the check's baseline, while the runner is open
    # Peak memory: never hold the inference session and the step session at once.
    episode.runner.release()
    session = step_session(episode)
    bar = None
    total = plan.epochs * steps_per_epoch(len(episode.train_set.pixels), plan.batch_size)
    if plan.progress and total:
        phase(f"training: {plan.epochs} epochs", plan.progress)
        bar = progress_bar(total, "adapt", unit="step")
        bar.update(state.step)

    def checkpoint(s: TrainState) -> None:
        if judged and s.batch == 0:  # an epoch just ended: its state is one of the check's candidates
            run_dir.save_epoch(s.epoch, s.trainable())  # before the checkpoint, so a resume never lacks it
        s.save(run_dir)

    with open(run_dir.log_path, "a") as log_file:
        def log(record: dict[str, Any]) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        try:
            train(plan, episode.train_set, session, state, _overlap(episode, plan), episode.bundle.manifest,
                  log=log, checkpoint=checkpoint, bar=bar)
        finally:
            if bar is not None:
                bar.close()
    return [json.loads(line) for line in run_dir.log_path.read_text().splitlines() if line.strip()]


# -- 7. commit: the report and the generation's metadata ---------------------------------------------

def make_report(episode: Episode, plan: Plan, verdict: Verdict, heads: Heads, records: list[dict[str, Any]],
                selection: dict[str, Any] | None, resumed_from: int | None) -> AdaptReport:
    task, current = episode.task, episode.current
    changed = [r["changed_fraction"] for r in records]
    seconds = [r["seconds"] for r in records]
    kept_records = [r for r in records if r["epoch"] <= verdict.kept_epochs] if verdict.keep else []
    added = [c for c in task.classes if c not in current.prototypes.classes]
    return AdaptReport(
        state="", steps=len(records), epochs=plan.epochs, images=len(task.pixels), skipped_unreadable=len(task.skipped),
        classes_updated=[c for c in task.classes if c not in added], classes_added=added, lr=plan.lr,
        final_loss=kept_records[-1]["loss"] if kept_records else None,
        changed_fraction_mean=float(np.mean(changed)) if changed else 0.0,
        changed_fraction_max=float(np.max(changed)) if changed else 0.0,
        step_seconds_median=float(np.median(seconds)) if seconds else None, peak_rss_mb=round(peak_rss_mb(), 1),
        memory_budget_mb=episode.profile.memory_budget_mb, drift_compensated=heads.drift_compensated,
        from_exemplars=heads.from_exemplars, replayed=len(episode.train_set.pixels) - len(episode.split.task_train),
        replayed_classes=episode.replayed_per_class(),
        exemplars_stored=int(len(heads.memory.labels)) if plan.use_exemplars else 0,
        lda_moved=heads.lda_moved, exemplar_bytes=heads.memory.nbytes if plan.use_exemplars else 0,
        selection=selection, gate=verdict.report, kept="adapted" if verdict.keep else "prototypes-only",
        kept_epochs=verdict.kept_epochs, resumed_from_step=resumed_from)


def commit_meta(episode: Episode, plan: Plan, report: AdaptReport, kept_steps: int,
                selection: dict[str, Any] | None) -> dict[str, Any]:
    """The generation's meta.json. samples_seen (the delta's merge weight) counts the images the
    committed state learned from: every training sample of a kept adaptation, else the task's images
    its new prototypes came from."""
    current = episode.current
    learned = kept_steps * plan.batch_size if report.kept == "adapted" else len(episode.task.pixels)
    config = {**episode.run_config(), "run_lr": plan.lr, "run_epochs": plan.epochs, "selection": selection}
    return {"data_dir": str(episode.data_dir), "config": config, "report": report.to_json(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps_total": int(current.meta.get("steps_total", 0)) + kept_steps,
            "samples_seen": int(current.meta.get("samples_seen", 0)) + learned}
