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
    strategy: Annotated[str, typer.Option(help="Merge strategy.")] = "weighted-mean",
    db: Annotated[str | None, typer.Option("--db", envvar="EDGECL_SERVER_DB", help="Server database URL.")] = None,
    store: Annotated[Path, typer.Option("--store", envvar="EDGECL_SERVER_STORE",
                                        help="Server store folder.")] = Path("~/.edgecl/server"),
) -> None:
    """Merge every device delta of BUNDLE_ID (weighted by samples seen) in the server's store."""
    from edgecl.server.service import merge_to_files

    summary = merge_to_files(store, db, bundle_id, bundle_version, strategy, out, overlap_out)
    typer.echo(f"merged {summary['inputs']} deltas of {bundle_id} v{summary['version']}: {summary['changed']} "
               f"elements changed ({summary['shared']} by several devices) -> {summary['out']}, "
               f"overlap -> {summary['overlap_out']}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
