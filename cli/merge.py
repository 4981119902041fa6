"""`edgecl merge`: merge a bundle's pushed deltas into one (then `edgecl apply` makes the new version)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def merge(
    bundle_id: Annotated[str, typer.Argument(help="Bundle id (manifest.bundle_id).")],
    bundle_version: Annotated[int | None, typer.Option(help="Bundle version (default: the newest "
                                                                "registered).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged delta file to write.")] = Path("merged.safetensors"),
    overlap_out: Annotated[Path | None, typer.Option(help="Updated overlap counts (default: OUT with "
                                                             ".overlap.safetensors).")] = None,
    strategy: Annotated[str, typer.Option(help="Merge strategy: weighted-mean, ties, trimmed-mean or median.")]
    = "weighted-mean",
    trim: Annotated[float | None, typer.Option(help="trimmed-mean: share of votes dropped at each end "
                                                   "(default 0.2).")] = None,
    max_share: Annotated[float | None, typer.Option(help="Largest weight share one device may hold (default "
                                                        "0.5).")] = None,
    exclude_device: Annotated[list[str] | None, typer.Option(help="Do not count this device (repeatable).")] = None,
    exclude_delta: Annotated[list[str] | None, typer.Option(help="Do not count this delta sha256 (repeatable).")]
    = None,
    db: Annotated[str | None, typer.Option("--db", envvar="EDGECL_SERVER_DB", help="Server database URL.")] = None,
    store: Annotated[Path, typer.Option("--store", envvar="EDGECL_SERVER_STORE",
                                        help="Server store folder.")] = Path("~/.edgecl/server"),
) -> None:
    """Merge each device's newest delta of BUNDLE_ID (bounded weights) in the server's store."""
    from edgecl.server.service import MergeRequest, merge_to_files

    request = MergeRequest(strategy=strategy, trim=trim, max_share=max_share,
                           exclude_devices=tuple(exclude_device or ()), exclude_deltas=tuple(exclude_delta or ()))
    summary = merge_to_files(store, db, bundle_id, bundle_version, request, out, overlap_out)
    typer.echo(f"merged {summary['inputs']} deltas of {bundle_id} v{summary['version']} ({summary['strategy']}; "
               f"devices {', '.join(summary['devices'])}): {summary['changed']} "
               f"elements changed ({summary['shared']} by several devices) -> {summary['out']}, "
               f"overlap -> {summary['overlap_out']}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
