"""What an adaptation will do, resolved once: options > device profile > bundle manifest defaults.

timm's ``resolve_*`` habit: every default is merged in one place into a frozen ``Plan``, so the
training loop and the post-steps never look at options, profile and manifest again. ``--select-lr``
and the do-no-harm gate run the same loop on a ``plan.sub(...)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from edgecl.errors import DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.config import Check, DeviceProfile

# What each option accepts beyond its type: (the check, its flag, an example for the fix). The
# options the manifest also holds take the manifest's own ranges, so `--lr nan` is refused by the
# rule that refuses a manifest with lr_backbone NaN.
REPLAY_SHARE = Check(low=0, high=1, high_open=True)
_OPTION_CHECKS: dict[str, tuple[Check, str, str]] = {
    "epochs": (mf.MANIFEST_CHECKS["epochs"], "--epochs", "--epochs 10 (0 only computes prototypes)"),
    "lr": (mf.MANIFEST_CHECKS["lr_backbone"], "--lr (the backbone learning rate)", "--lr 0.01"),
    "lr_head": (mf.MANIFEST_CHECKS["lr_head"], "--lr-head (the head learning rate)", "--lr-head 0.01"),
    "batch_size": (mf.MANIFEST_CHECKS["batch_size"], "--batch-size (images per step)", "--batch-size 32"),
    "seed": (mf.MANIFEST_CHECKS["seed"], "--seed", "--seed 1993"),
    "checkpoint_every": (Check(low=1), "--checkpoint-every (steps between checkpoints)", "--checkpoint-every 50"),
    "replay_share": (REPLAY_SHARE, "--replay-share (the replay share)", "--replay-share 0.5"),
    "holdout_share": (Check(low=0, high=1, low_open=True, high_open=True), "--holdout-share (the held-out share)",
                      "--holdout-share 0.2"),
    "max_step_fraction": (Check(low=0, high=1), "--max-step-fraction", "--max-step-fraction 0.005 (0 = no cap)"),
    "head": (Check(choices=("auto", "ncm", "lda")), "--head", "--head auto"),
    "max_old_drop": (Check(low=0), "--max-old-drop (points the old classes may lose)", "--max-old-drop 1"),
}


def check_option(name: str, value: object) -> None:
    """One option against its range: a DeviceError naming the flag and a value that works."""
    check, flag, example = _OPTION_CHECKS[name]
    problem = check.problem(value) if value is not None else None
    if problem:
        raise DeviceError(f"{flag} {problem}", f"pass e.g. {example}")


def check_replay_share(share: float) -> None:
    """The one check of a replay share (resolve_plan and adapt.replay_repeats both call it)."""
    check_option("replay_share", share)


@dataclass
class AdaptOptions:
    epochs: int | None = None             # None = manifest.epochs; 0 = prototypes only
    lr: float | None = None               # backbone (delta) lr; None = manifest.lr_backbone
    lr_head: float | None = None          # projection head lr; None = manifest.lr_head
    batch_size: int | None = None         # images per step (2x views); None = profile's, else manifest's
    seed: int | None = None               # None = manifest.seed
    checkpoint_every: int = 50            # steps between checkpoints (and at each epoch end, and the end)
    drift_compensation: bool = True       # move old prototypes without exemplars by SDC (edgecl.classstats)
    drift_sigma: float | None = None      # None = data-driven (classstats.default_sigma)
    exemplars: bool | None = None         # None = profile.store_images
    replay: bool = True                   # with exemplars: mix old classes' exemplars into the training data
    replay_share: float = 0.5             # repeat them to about this share of the data (0 = each once)
    select_lr: bool = False               # choose lr and epochs on the held-out split first
    gate: bool = True                     # do no harm: keep the adaptation only if it is not worse held out
    holdout_share: float = 0.2            # share of each class held out for the gate / --select-lr
    head: str = "auto"                    # head the gate scores with (auto = lda: adapt always collects it)
    max_old_drop: float | None = None     # points the old classes' held-out exemplars may lose (None: judge overall only)
    max_step_fraction: float = 0.005      # never let more than this share of ALL weights change in a step
                                          # (docs/method.md#step-3: "under 0.5%"); 0 = no cap
    resume: bool = False                  # continue the interrupted run
    progress: bool = True                 # progress bar on stderr (quiet when stderr is not a terminal)

    def __post_init__(self) -> None:
        self.check()  # a bad flag fails before adapt opens, locks or writes anything

    def check(self) -> None:
        for name in _OPTION_CHECKS:
            check_option(name, getattr(self, name))


@dataclass(frozen=True)
class Plan:
    epochs: int
    lr: float
    lr_head: float
    batch_size: int
    seed: int
    drop_rate: float
    weight_decay: float
    overlap_decay: float
    max_gated: int                        # per-step cap on open gates (-1 = none)
    use_exemplars: bool
    replay: bool
    replay_share: float
    drift_compensation: bool
    drift_sigma: float | None
    select_lr: bool
    gate: bool
    holdout_share: float
    head: str
    max_old_drop: float | None
    checkpoint_every: int
    progress: bool

    def sub(self, **changes: object) -> Plan:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def fingerprint(self) -> dict[str, object]:
        """The fields a resumed run must share with the interrupted one."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "checkpoint_every")}


def resolve_plan(opts: AdaptOptions, profile: DeviceProfile, manifest: mf.BundleManifest, total_selected: int) -> Plan:
    opts.check()  # again: the fields may have been changed since the options were made
    epochs = manifest.epochs if opts.epochs is None else int(opts.epochs)
    # The step graph's row count is fixed at export: a profile's larger batch is capped to it.
    batch_size = int(opts.batch_size if opts.batch_size is not None
                     else min(profile.batch_size or manifest.batch_size, manifest.batch_size))
    if batch_size > manifest.batch_size:
        raise DeviceError(f"--batch-size {batch_size} is larger than the bundle's step graph "
                          f"({manifest.batch_size} images x 2 views)",
                          f"pass --batch-size {manifest.batch_size} or less, or export with a larger batch")
    lr = manifest.lr_backbone if opts.lr is None else float(opts.lr)
    max_gated = -1
    if opts.max_step_fraction > 0:
        max_gated = int(math.floor(opts.max_step_fraction * manifest.total_params))
        expected = total_selected * (1.0 - manifest.drop_rate)
        if expected > 1.05 * max_gated:
            warnings.warn(f"the per-step budget ({100 * opts.max_step_fraction:g}% of all weights) is below the "
                          f"expected open gates ({expected / manifest.total_params:.3%}): the effective drop rate is "
                          f"{1 - max_gated / max(total_selected, 1):.3f}", stacklevel=3)
    use_exemplars = profile.store_images if opts.exemplars is None else bool(opts.exemplars and profile.store_images)
    return Plan(epochs=epochs, lr=lr, lr_head=manifest.lr_head if opts.lr_head is None else float(opts.lr_head),
                batch_size=batch_size, seed=manifest.seed if opts.seed is None else int(opts.seed),
                drop_rate=manifest.drop_rate, weight_decay=manifest.weight_decay,
                overlap_decay=manifest.overlap_decay, max_gated=max_gated, use_exemplars=use_exemplars,
                replay=opts.replay, replay_share=opts.replay_share, drift_compensation=opts.drift_compensation,
                drift_sigma=opts.drift_sigma, select_lr=opts.select_lr, gate=opts.gate,
                holdout_share=opts.holdout_share, head="lda" if opts.head == "auto" else opts.head,
                max_old_drop=opts.max_old_drop,
                checkpoint_every=opts.checkpoint_every, progress=opts.progress)
