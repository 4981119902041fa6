"""`edgecl eval`: accuracy of the bundle's current state on labelled image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .device import BundleArg, ConfigOpt, DeviceOpt, resolve_bundle, resolve_profile
from .options import HEAD_HELP, Head, JsonFlag, echo_json


def _print_report(report: dict[str, Any], indent: str) -> None:
    for name, row in report["per_class"].items():
        typer.echo(f"{indent}{name}: {100 * row['accuracy']:.2f}% of {row['images']}")
    for c in report["most_confused"]:
        typer.echo(f"{indent}confused {c['true']} -> {c['predicted']}: {c['count']}")
    if report["skipped_unreadable"] or report["skipped_unknown_class"]:
        typer.echo(f"{indent}skipped: {report['skipped_unreadable']} unreadable, {report['skipped_unknown_class']} "
                   "of classes without a prototype")


def evaluate(
    data: Annotated[list[Path], typer.Option("--data", help="Image folder DATA/<class name>/<images>; repeat "
                                                            "--data to evaluate several (each is reported, "
                                                            "then all together).")],
    bundle: BundleArg = None,
    device: DeviceOpt = None,
    head: Annotated[Head, typer.Option(help=HEAD_HELP)] = Head.auto,
    as_json: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy overall and per class, and the most confused class pairs."""
    from edgecl.device.infer import evaluate as run_evaluate

    bundle, cfg = resolve_bundle(bundle, config)
    result = run_evaluate(bundle, data, profile=resolve_profile(device, cfg), head=head.value, progress=not quiet)
    if as_json:
        echo_json(result)
        return
    folders = result["folders"]
    if len(folders) > 1:
        for report in folders:
            typer.echo(f"{report['data']}: accuracy {100 * report['accuracy']:.2f}% "
                       f"({report['correct']}/{report['images']})")
            _print_report(report, "  ")
    where = "all folders" if len(folders) > 1 else folders[0]["data"]
    typer.echo(f"{'overall ' if len(folders) > 1 else ''}accuracy {100 * result['accuracy']:.2f}% ({result['correct']} of {result['images']} images in "
               f"{where}), {result['head']} head, state {result['state']} of {bundle}")
    _print_report(result, "  ")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
