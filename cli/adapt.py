"""`edgecl adapt`: drop-gated sparse tuning of a bundle on this device's images (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def adapt(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgecl export`.")],
    data: Annotated[Path | None, typer.Option("--data", help="Image folder: DATA/<class name>/<images>.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (0 = only compute the classes' prototypes). "
                                                       "Default: the bundle's.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the sparse delta. Default: the bundle's.")] = None,
    lr_head: Annotated[float | None, typer.Option(help="Learning rate of the projection head.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (two views each).")] = None,
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml): threads, "
                                                                  "execution provider, batch size, budgets.")] = None,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    from_review: Annotated[bool, typer.Option("--from-review", help="Train on the images labeled in "
                                                                   "`edgecl review` (BUNDLE/review/labeled).")] = False,
) -> None:
    """Adapt BUNDLE to the images in DATA; the previous state is kept for `edgecl rollback`."""
    from edgecl.device.adapt import AdaptOptions
    from edgecl.device.adapt import adapt as run_adapt
    from edgecl.device.review import labeled_folder

    data = labeled_folder(bundle, data, from_review)

    report = run_adapt(bundle, data, AdaptOptions(
        epochs=epochs, lr=lr, lr_head=lr_head, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
        drift_compensation=drift_compensation, exemplars=exemplars, replay=replay, replay_share=replay_share, select_lr=select_lr,
        resume=resume, max_step_fraction=max_step_fraction, gate=gate, holdout_share=holdout_share, head=head,
        progress=not quiet), profile=device)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    r = report
    replayed = f" + {r.replayed} exemplars of old classes" if r.replayed else ""
    typer.echo(f"adapted {bundle} -> state {r.state}: {r.steps} steps, {r.epochs} epochs, {r.images} images"
               f"{replayed} ({r.skipped_unreadable} unreadable skipped), lr {r.lr:g}")
    if r.steps:
        typer.echo(f"final loss {r.final_loss:.4f}; changed per step {100 * r.changed_fraction_mean:.3f}% of all "
                   f"weights (max {100 * r.changed_fraction_max:.3f}%); {r.step_seconds_median:.3f} s/step")
    typer.echo(f"classes updated: {', '.join(r.classes_updated) or '-'}; added: {', '.join(r.classes_added) or '-'}")
    if r.drift_compensated or r.from_exemplars:
        typer.echo(f"old prototypes: drift-compensated {', '.join(r.drift_compensated) or '-'}; "
                   f"moved by their exemplars' drift {', '.join(r.from_exemplars) or '-'}")
    if r.selection:
        c = r.selection["chosen"]
        typer.echo(f"--select-lr chose lr {c['lr']:g}, {c['epochs']} epochs (held-out accuracy {c['accuracy']:.3f})")
    if r.gate:
        g = r.gate
        kept = g["kept"] if g["kept"] != "adapted" else f"adapted (epoch {r.kept_epochs} of {r.epochs})"
        typer.echo(f"do-no-harm gate ({g['head']} head, {g['held_out_images']} held-out images): adapted "
                   f"{g['adapted_accuracy']:.3f} after epoch {g['adapted_epochs']} vs prototypes only "
                   f"{g['prototypes_only_accuracy']:.3f} -> kept {kept}")
    budget = f" (budget {r.memory_budget_mb} MB)" if r.memory_budget_mb else ""
    typer.echo(f"peak memory {r.peak_rss_mb:.0f} MB{budget}")


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
