"""`edgecl demo`: the whole host -> device -> fleet loop on the embedded default (real model, real images)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, bundles, server store and report.")]
    = Path("demo-out"),
    fast: Annotated[bool, typer.Option("--fast", help="Fewer images and one epoch: a quick smoke run.")] = False,
    epochs: Annotated[int, typer.Option(help="Device epochs (0 = the bundle's default, or 1 with --fast).")] = 0,
    threads: Annotated[int, typer.Option(help="onnxruntime threads per device process (0 = default).")] = 0,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete OUT first.")] = False,
    share_exemplars: Annotated[bool, typer.Option("--share-exemplars", help=(
        "Both devices share their exemplar images (mode 2): the release consolidates the merged step on them, "
        "then asks both devices for their classes' statistics (--ask-shared)."))] = False,
) -> None:
    """Run export -> two devices adapt -> deltas -> server -> push -> merge -> apply, and print the table."""
    from edgecl.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=out, fast=fast, epochs=epochs, threads=threads, fresh=fresh,
                         share_exemplars=share_exemplars), echo=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
