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
    unknown: Annotated[list[Path] | None, typer.Option("--unknown", help="Folder of images of no known class: "
                                                       "reports how well the unknown score separates them "
                                                       "(AUROC) and the shares flagged.")] = None,
) -> None:
    """Accuracy overall and per class, and the most confused class pairs."""
    from edgecl.device.infer import evaluate as run_evaluate

    bundle, cfg = resolve_bundle(bundle, config)
    result = run_evaluate(bundle, data, profile=resolve_profile(device, cfg), head=head.value, progress=not quiet,
                          unknown_dirs=unknown or [])
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
    if "unknown_detection" in result:
        _print_unknown(result["unknown_detection"])


def _share(value: float | None) -> str:
    return "n/a (no calibration)" if value is None else f"{100 * value:.1f}%"


def _print_unknown(u: dict[str, Any]) -> None:
    auroc = "n/a" if u["auroc"] is None else f"{u['auroc']:.3f}"
    typer.echo(f"unknown detection ({u['score']} score): AUROC {auroc} on {u['known_images']} known and "
               f"{u['unknown_images']} unknown images")
    target = "" if u["target_false_unknown_rate"] is None else f" (target {100 * u['target_false_unknown_rate']:.0f}%)"
    typer.echo(f"  known images flagged unknown: {_share(u['known_flagged'])}{target}")
    typer.echo(f"  unknown images flagged unknown: {_share(u['unknown_flagged'])}")
    if len(u["folders"]) > 1:
        for f in u["folders"]:
            auroc_f = "n/a" if f["auroc"] is None else f"{f['auroc']:.3f}"
            typer.echo(f"  {f['data']}: AUROC {auroc_f}, flagged {_share(f['flagged'])}")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
