"""Named experiments: every B1 / B6 result file comes from one of these, by
`python benchmarks/b1_b6_accuracy/run.py NAME`.

An experiment is a stream (b1: Fashion-MNIST 5 x 2 classes; b6: the 10 classes through five cameras,
domains.py), a per-class subsample, seeds, and arms. An arm is one method with its
settings and a learning-rate grid; the lr and each head's parameter are chosen on the validation
split's mean accuracy (averaged over seeds), the same rule for every arm; test numbers are reported.
``lr_from`` runs an arm at another arm's chosen lr (the edgecl path at the torch reference's).

Settings not named in an arm are the device's defaults: TrainConfig (torch_methods.py) and
StreamRules (harness.py): 20 exemplars per class, replay share 0.5, old classes shifted by their
exemplars' drift, every head (ncm, lda, lda-map, ranpac).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

SEEDS3 = (1993, 7, 42)
ALL_HEADS = ("ncm", "ncm-map", "lda", "lda-map", "ranpac")


@dataclass(frozen=True)
class Arm:
    label: str
    method: str                                  # frozen | full_ft | mist | edgecl | edgecl-nogate
    lrs: tuple[float, ...] = ()
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig overrides
    rules: dict[str, Any] = field(default_factory=dict)   # StreamRules overrides
    lr_from: str | None = None                   # run at this arm's chosen lr (when lrs is empty)


@dataclass(frozen=True)
class Experiment:
    bench: str                                   # b1 | b6
    per_class: tuple[int, int, int]              # train / val / test images per class (per domain in b6)
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (1993,)
    size: int = 64
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig overrides for every arm
    rules: dict[str, Any] = field(default_factory=dict)   # StreamRules overrides for every arm
    note: str = ""
    folder: str | None = None                    # share another experiment's run files (out/FOLDER/runs)


FROZEN = Arm("frozen", "frozen")


def _mist(label: str, lrs: tuple[float, ...] = (1e-2,), **train: Any) -> Arm:
    return Arm(label, "mist", lrs, train)


def _levers(b6: bool) -> tuple[Arm, ...]:
    """The lever ablation (issue 12): one lever moved at a time from the base (lr 1e-2, 2 epochs,
    select 5%, drop 0.9, mask re-scored per task, SupCon), on the torch reference."""
    # most telling first: a stopped ablation still answers the main questions
    arms = [
        FROZEN,
        _mist("mist base"),
        _mist("mist supcon+proto", loss="supcon+proto"),
        _mist("mist 6 epochs", epochs=6),
        _mist("mist lr 3e-2", (3e-2,)),
        _mist("mist lr 3e-3", (3e-3,)),
        _mist("mist supcon+proto 6 epochs", loss="supcon+proto", epochs=6),
        _mist("mist select 2% drop 0.75", select_rate=0.02, drop_rate=0.75),
        _mist("mist select 10% drop 0.95", select_rate=0.10, drop_rate=0.95),
        _mist("mist mask of task 1 only", rescore=False),
        Arm("full FT lr 1e-2", "full_ft", (1e-2,)),
        Arm("mist replay earlier cameras", "mist", (1e-2,), rules={"replay_seen": True}) if b6 else
        Arm("mist no replay", "mist", (1e-2,), rules={"replay": False}),
        _mist("mist 10 epochs", epochs=10),
        _mist("mist 6 epochs lr 3e-3", (3e-3,), epochs=6),
        Arm("full FT lr 1e-3", "full_ft", (1e-3,)),
    ]
    return tuple(arms)


EXPERIMENTS: dict[str, Experiment] = {
    # a few minutes: does the whole harness run (CI-sized data, one task's worth of steps)
    "smoke_b1": Experiment("b1", (20, 10, 20), (FROZEN, _mist("mist", (1e-2,), epochs=1),
                                               Arm("full FT", "full_ft", (1e-2,), {"epochs": 1}))),
    "smoke_edgecl": Experiment("b1", (20, 10, 20), (FROZEN, _mist("mist", (1e-2,), epochs=1),
                                                   Arm("edgecl", "edgecl", (), {"epochs": 1}, lr_from="mist"))),
    "smoke_b6": Experiment("b6", (6, 4, 6), (FROZEN, _mist("mist", (1e-2,), epochs=1, loss="supcon+proto"))),
    # the lever ablation on small subsets (issue 12), one seed, torch reference
    "ablation_b1": Experiment("b1", (100, 50, 100), _levers(b6=False),
                              note="lever ablation, torch reference, small subset (100/50/100 per class)"),
    # B6: RanPAC (the slowest head to score) only on the frozen backbone, where it can be the best head;
    # on a moving backbone its ReLU statistics cannot be carried (B1 history: it collapses)
    "ablation_b6": Experiment("b6", (50, 30, 60),
                              (Arm("frozen", "frozen", rules={"heads": ALL_HEADS}), *_levers(b6=True)[1:]),
                              rules={"heads": ("ncm", "ncm-map", "lda", "lda-map")},
                              note="lever ablation, torch reference, small subset (50/30/60 per class per camera)"),
}


def _confirm(name: str, labels: tuple[str, ...]) -> Experiment:
    """The ablation's leading arms over three seeds, in the ablation's run folder (seed 1993 reused)."""
    base = EXPERIMENTS[name]
    return replace(base, arms=tuple(a for a in base.arms if a.label in labels), seeds=SEEDS3, folder=name,
                   note=base.note + "; leading arms over three seeds")


CONFIRM = ("frozen", "mist base", "mist 6 epochs", "mist 10 epochs", "mist lr 3e-3", "mist supcon+proto",
           "mist select 2% drop 0.75", "mist 6 epochs lr 3e-3", "full FT lr 1e-3")
EXPERIMENTS["confirm_b1"] = _confirm("ablation_b1", CONFIRM)
EXPERIMENTS["confirm_b6"] = _confirm("ablation_b6", CONFIRM)


def _parity(name: str) -> Experiment:
    """The real edgecl path beside the torch reference at the same settings (the ablation's base),
    same seeds, in the ablation's run folder."""
    base = EXPERIMENTS[name]
    arms = tuple(a for a in base.arms if a.label in ("frozen", "mist base"))
    return replace(base, arms=(*arms, Arm("edgecl base", "edgecl", lr_from="mist base")), seeds=SEEDS3,
                   folder=name, note=base.note + "; the edgecl path at the torch base's settings")


EXPERIMENTS["parity_b1"] = _parity("ablation_b1")
EXPERIMENTS["parity_b6"] = _parity("ablation_b6")


# issue 11: the default mask policy (depthwise weights never selected) against the old one (every
# tensor may be selected), torch reference at the ablation's base settings, three seeds
EXPERIMENTS["mask_b1"] = replace(
    EXPERIMENTS["ablation_b1"], seeds=SEEDS3, folder="ablation_b1",
    arms=(FROZEN, _mist("mist base"), _mist("mist base mask policy all", mask_policy="all")),
    note="mask policy no-depthwise (default) vs all, torch reference, small subset, three seeds")


# issue 12: the shipped defaults (ExportOptions / AdaptOptions: lr 1e-2, 10 epochs, replay of every
# class the memory holds, the do-no-harm gate on), chosen on validation from the lever ablation
# (levers.py: "mist 10 epochs" leads the validation average over B1 and B6; replaying a class's
# earlier camera leads B6's replay rules), on the real edgecl path beside its torch twin, three seeds
DEFAULTS = {"epochs": 10}
EXPERIMENTS["defaults_b1"] = replace(
    EXPERIMENTS["ablation_b1"], seeds=SEEDS3, folder="ablation_b1",
    arms=(FROZEN, _mist("mist 10 epochs", **DEFAULTS),
          Arm("edgecl defaults", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True})),
    note="the shipped defaults on the edgecl path and the torch reference, small subset, three seeds")
EXPERIMENTS["defaults_b6"] = replace(
    EXPERIMENTS["ablation_b6"], seeds=SEEDS3, folder="ablation_b6",
    arms=(Arm("frozen", "frozen", rules={"heads": ALL_HEADS}), _mist("mist 10 epochs", **DEFAULTS),
          Arm("mist 10 epochs replay earlier cameras", "mist", (1e-2,), DEFAULTS, rules={"replay_seen": True}),
          Arm("edgecl defaults", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True}),
          # what the do-no-harm gate costs (its 20% hold-out and its refusals): the same path with --no-gate
          Arm("edgecl defaults no gate", "edgecl-nogate", (1e-2,), DEFAULTS, rules={"replay_seen": True})),
    note="the shipped defaults on the edgecl path and the torch reference, small subset, three seeds")

# issue 12, B1 forgetting (edgecl 11.8 vs frozen 10.4 at the defaults): does replaying more of the
# stored exemplars (share 0.75 of the training data instead of 0.5) protect the first tasks?
EXPERIMENTS["replay_b1"] = replace(
    EXPERIMENTS["defaults_b1"],
    arms=(*EXPERIMENTS["defaults_b1"].arms,
          Arm("edgecl replay share 0.75", "edgecl", (1e-2,), DEFAULTS,
              rules={"replay_seen": True, "replay_share": 0.75})),
    note="the edgecl path at the defaults with more replay, beside the defaults, three seeds")

# issue 23, old classes guarded: `adapt --max-old-drop 1` beside the defaults (what it costs the last
# task, what it protects on the first), B1 and B6.
EXPERIMENTS["guard_b1"] = replace(
    EXPERIMENTS["defaults_b1"],
    arms=(FROZEN, Arm("edgecl defaults", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True}),
          Arm("edgecl max-old-drop 1", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True, "max_old_drop": 1.0}),
          # the same with the CLI's default delta encoding (int4) in the chained path
          Arm("edgecl max-old-drop 1 int4", "edgecl", (1e-2,), DEFAULTS,
              rules={"replay_seen": True, "max_old_drop": 1.0, "delta_values": "int4"})),
    note="the edgecl path with the old classes guarded (--max-old-drop 1) beside the defaults")
EXPERIMENTS["guard_b6"] = replace(
    EXPERIMENTS["defaults_b6"],
    arms=(Arm("frozen", "frozen", rules={"heads": ALL_HEADS}),
          Arm("edgecl defaults", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True}),
          Arm("edgecl max-old-drop 1", "edgecl", (1e-2,), DEFAULTS, rules={"replay_seen": True, "max_old_drop": 1.0})),
    note="the edgecl path with the old classes guarded (--max-old-drop 1) beside the defaults")


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
