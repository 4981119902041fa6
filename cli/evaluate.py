"""`edgecl eval`: accuracy of the bundle's current state on a labelled image folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    data: Annotated[Path, typer.Option("--data", help="Image folder: DATA/<class name>/<images>.")],
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (.toml).")] = None,
    head: Annotated[str, typer.Option(help="Classifier: ncm (cosine to prototypes), lda (prototypes + the "
                                           "pooled covariance adapt accumulates), auto (lda when available).")]
    = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (key `accuracy` overall).")] = False,
) -> None:
    """Accuracy overall and per class, and the most confused class pairs."""
    from edgecl.device.infer import evaluate as run_evaluate

    result = run_evaluate(bundle, data, profile=device, head=head)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"accuracy {100 * result['accuracy']:.2f}% ({result['correct']}/{result['images']}) "
               f"with state {result['state']}, head {result['head']}")
    for name, row in result["per_class"].items():
        typer.echo(f"  {name}: {100 * row['accuracy']:.2f}% of {row['images']}")
    for c in result["most_confused"]:
        typer.echo(f"  confused {c['true']} -> {c['predicted']}: {c['count']}")
    if result["skipped_unreadable"] or result["skipped_unknown_class"]:
        typer.echo(f"skipped: {result['skipped_unreadable']} unreadable, {result['skipped_unknown_class']} "
                   "of classes without a prototype")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
