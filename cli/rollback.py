"""`edgecl rollback`: return a bundle's device state to what it was before the last adapt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def rollback(bundle: Annotated[Path, typer.Argument(help="Bundle folder.")], as_json: JsonFlag = False) -> None:
    """Undo the last `edgecl adapt` (once)."""
    from edgecl.device.state import rollback as run_rollback

    result = run_rollback(bundle)
    if as_json:
        echo_json(result)
        return
    typer.echo(f"rolled back {result['undone']}; current state: {result['current']}")


def register(app: typer.Typer) -> None:
    app.command("rollback")(rollback)
