"""`edgecl adapt`: drop-gated sparse tuning of a bundle on this device's images (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .device import BundleArg, ConfigOpt, bundle_words, resolve_bundle, resolve_profile


def adapt(
    data: Annotated[Path | None, typer.Option("--data", help="Image folder: DATA/<class name>/<images>.")] = None,
    bundle: BundleArg = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (0 = only compute the classes' prototypes). "
                                                       "Default: the bundle's.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the sparse delta. Default: the bundle's.")] = None,
    lr_head: Annotated[float | None, typer.Option(help="Learning rate of the projection head.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (two views each).")] = None,
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml): threads, execution "
                                                                  "provider, batch size, budgets. Default: the "
                                                                  "device config's, else the bundle's.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted adaptation.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of shuffling, augmentation and drop gate.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 50,
    drift_compensation: Annotated[bool, typer.Option("--drift-compensation/--no-drift-compensation",
                                                     help="Move old classes' prototypes by their estimated "
                                                          "drift.")] = True,
    exemplars: Annotated[bool | None, typer.Option("--exemplars/--no-exemplars",
                                                      help="Keep a few images per class to refresh old "
                                                           "prototypes. Default: the profile's store_images.")] = None,
    replay: Annotated[bool, typer.Option("--replay/--no-replay",
                                         help="With exemplars: train on the old classes' exemplars too, "
                                              "so new classes are learned apart from them.")] = True,
    replay_share: Annotated[float, typer.Option(help="Repeat the replayed exemplars to about this share of "
                                                     "the training images (0 = each once).")] = 0.5,
    select_lr: Annotated[bool, typer.Option("--select-lr", help="Choose lr and epochs on a held-out split "
                                                               "of DATA first.")] = False,
    max_step_fraction: Annotated[float, typer.Option(help="Cap on the share of ALL weights changed in one "
                                                          "step (0 = no cap).")] = 0.005,
    gate: Annotated[bool, typer.Option("--gate/--no-gate", help="Do no harm: hold out a share of each class and "
                                                                "keep the backbone move only if it is not worse "
                                                                "there than prototypes only.")] = True,
    holdout_share: Annotated[float, typer.Option(help="Share of each class held out for the gate and "
                                                      "--select-lr.")] = 0.2,
    head: Annotated[str, typer.Option(help="Head the gate scores with: auto (= lda), ncm or lda.")] = "auto",
    max_old_drop: Annotated[float | None, typer.Option(help="Points the old classes may lose on their held-out "
                                                            "images (95% upper bound); more refuses the epoch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    config: ConfigOpt = None,
    from_review: Annotated[bool, typer.Option("--from-review", help="Train on the images labeled in "
                                                                   "`edgecl review` (BUNDLE/review/labeled).")] = False,
) -> None:
    """Adapt BUNDLE to the images in DATA; the previous state is kept for `edgecl rollback`."""
    from edgecl.device.adapt import AdaptOptions
    from edgecl.device.adapt import adapt as run_adapt
    bundle, cfg = resolve_bundle(bundle, config)
    from edgecl.device.review import labeled_folder

    data = labeled_folder(bundle, data, from_review)
    from edgecl.progress import phases
    options = AdaptOptions(
        epochs=epochs, lr=lr, lr_head=lr_head, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
        drift_compensation=drift_compensation, exemplars=exemplars, replay=replay, replay_share=replay_share, select_lr=select_lr,
        resume=resume, max_step_fraction=max_step_fraction, gate=gate, holdout_share=holdout_share, head=head,
        max_old_drop=max_old_drop, progress=not quiet)
    # edgecl.device.adapt announces its phases (reading, training with its bar, the check, statistics).
    with phases(0, "adapt", enabled=not (quiet or as_json)):
        report = run_adapt(bundle, data, options, profile=resolve_profile(device, cfg))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    for line in summary_lines(report, bundle, data):
        typer.echo(line)
    typer.echo(f"next: edgecl delta{bundle_words(bundle, cfg)} -o delta.safetensors   (then `edgecl push "
               "delta.safetensors`; `edgecl rollback` undoes this adaptation)")


def _kept_epoch_loss(bundle: Path, state: str, epoch: int) -> float | None:
    """The loss of the last step of ``epoch`` in the committed state's step log (None if absent).
    The report's final_loss belongs to the last epoch, which the do-no-harm check may have thrown away."""
    from edgecl.device.state import STATE_DIR, STEP_LOG

    path = bundle / STATE_DIR / state / STEP_LOG
    loss = None
    try:
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("epoch") == epoch:
                loss = record.get("loss")
    except (OSError, ValueError):
        return None
    return loss


def summary_lines(r: Any, bundle: Path, data: Path) -> list[str]:
    """The plain report of one adaptation: what was learned from what, what the check kept and why."""
    lines = []
    classes = len(r.classes_added) + len(r.classes_updated)
    unreadable = f", {r.skipped_unreadable} unreadable skipped" if r.skipped_unreadable else ""
    lines.append(f"adapted {bundle} on {r.images} images of {classes} classes from {data}{unreadable}; "
                 f"new state {r.state}")
    lines.append(f"  classes added: {', '.join(r.classes_added) or '-'}; seen again: {', '.join(r.classes_updated) or '-'}")
    if r.steps:
        replay = (f"; each epoch also replayed the old classes' stored images {r.replayed} times (exemplars, "
                  "repeated to balance the new images)" if r.replayed else "")
        lines.append(f"  training: {r.epochs} epochs, {r.steps} steps, lr {r.lr:g}{replay}")
        lines.append(f"  per step: {100 * r.changed_fraction_mean:.3f}% of all weights changed (max "
                     f"{100 * r.changed_fraction_max:.3f}%), {r.step_seconds_median:.3f} s")
    elif r.epochs == 0:
        lines.append("  training: none (--epochs 0): the backbone is unchanged, only the classes' prototypes were made")
    if r.selection:
        c = r.selection["chosen"]
        lines.append(f"  --select-lr chose lr {c['lr']:g}, {c['epochs']} epochs (held-out accuracy {c['accuracy']:.3f})")
    if r.gate:
        lines.extend(_gate_lines(r, bundle))
    elif r.steps:
        loss = r.final_loss
        lines.append(f"  kept the adapted backbone (no do-no-harm check); loss at the end: "
                     f"{'n/a' if loss is None else format(loss, '.4f')}")
    moved = []
    if r.from_exemplars:
        moved.append(f"{', '.join(r.from_exemplars)} by how their stored images moved")
    if r.drift_compensated:
        moved.append(f"{', '.join(r.drift_compensated)} by an estimate from the new images (no stored images)")
    if moved:
        lines.append("  old classes re-placed for the changed backbone: " + "; ".join(moved))
    budget = f" (budget {r.memory_budget_mb} MB)" if r.memory_budget_mb else ""
    lines.append(f"  peak memory {r.peak_rss_mb:.0f} MB{budget}")
    return lines


def _gate_lines(r: Any, bundle: Path) -> list[str]:
    g = r.gate
    adapted, frozen = g["adapted_accuracy"], g["prototypes_only_accuracy"]
    images = g["held_out_images"]
    if g.get("max_old_drop") is not None and not g.get("epochs"):
        return [f"  old classes guarded (--max-old-drop {g['max_old_drop']:g} points): {g['old_held_out_images']} "
                f"held-out stored images of the old classes cannot bound the drop under that (losing none, "
                f"{g['old_drop_upper_best_case']:.1f} points at {g['old_confidence']:.0%}; it takes "
                f"{g['old_images_needed'] or 'more than any number of'} images): nothing was trained",
                f"  -> kept the UNCHANGED backbone ({100 * frozen:.1f}% on {images} held-out images); the new "
                "classes were added from it"]
    lines = [f"  do-no-harm check on {images} held-out images (not trained on), {g['head']} head: adapted backbone "
             f"{100 * adapted:.1f}% (after epoch {g['adapted_epochs']}) vs unchanged backbone {100 * frozen:.1f}%"]
    if g["kept"] != "adapted":
        lines.append("  -> kept the UNCHANGED backbone (the adapted one was worse); the new classes were added "
                     "from it")
    else:
        why = "a tie, and a tie keeps it" if adapted == frozen else "better than unchanged"
        lines.append(f"  -> kept the adapted backbone, as it was after epoch {r.kept_epochs} of {r.epochs} ({why})")
        last = [e["accuracy"] for e in g.get("epochs") or [] if e.get("epochs") == r.epochs]
        if r.kept_epochs < r.epochs and last:
            lines.append(f"     (after epoch {r.epochs} it scored {100 * last[0]:.1f}%, below unchanged)")
        loss = _kept_epoch_loss(bundle, r.state, r.kept_epochs)
        if loss is not None:
            lines.append(f"  loss at the end of the kept epoch {r.kept_epochs}: {loss:.4f}")
    if g.get("max_old_drop") is not None and g.get("prototypes_only_old_accuracy") is not None:
        kept = [e for e in g.get("epochs") or [] if e.get("epochs") == g["adapted_epochs"]]
        bound = (f"; the kept epoch's 95% bound on their drop {kept[0]['old_drop_upper']:.1f} points"
                 if kept and g["kept"] == "adapted" and "old_drop_upper" in kept[0] else "")
        lines.append(f"  old classes guarded (--max-old-drop {g['max_old_drop']:g} points): unchanged backbone "
                     f"{100 * g['prototypes_only_old_accuracy']:.1f}% on their {g.get('old_held_out_images', '')} "
                     f"held-out stored images{bound}")
    before, after = g.get("before_per_class") or {}, g.get("after_per_class") or {}
    drops = [(c, before[c], after[c]) for c in before if c in after and after[c] < before[c]]
    if drops:
        lines.append("  classes that fell on the held-out images: "
                     + ", ".join(f"{c} {100 * b:.0f}% -> {100 * a:.0f}%" for c, b, a in drops))
    return lines


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
