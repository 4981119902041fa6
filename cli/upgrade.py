"""`edgecl upgrade`: carry this device's exemplars and local classes to the next model version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def upgrade(
    old: Annotated[Path, typer.Argument(help="The bundle this device has been adapting (its state is read).")],
    new: Annotated[Path, typer.Argument(help="The next version of it (from `edgecl apply`); gets the state.")],
    any_lineage: Annotated[bool, typer.Option("--any-lineage", help="Allow a NEW that was not made from OLD.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Move the device's local memory (exemplars, classes NEW lacks) from OLD to NEW."""
    from edgecl.device.upgrade import upgrade as run_upgrade

    result = run_upgrade(old, new, any_lineage=any_lineage)
    if as_json:
        echo_json(result)
        return
    typer.echo(f"upgraded {old} -> {new} (state {result['state']}): {result['exemplars']} exemplars of "
               f"{len(result['exemplar_classes'])} classes ({result['exemplar_bytes'] / 1e6:.1f} MB); classes "
               f"{', '.join(result['classes']) or '-'}; carried from the device: "
               f"{', '.join(result['carried_prototypes']) or '-'}")
    typer.echo(f"next: edgecl eval {new} --data DIR   (`edgecl rollback {new}` drops what was carried over)")


def register(app: typer.Typer) -> None:
    app.command("upgrade")(upgrade)
