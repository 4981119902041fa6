"""`edgecl serve` (deprecated, removed in 0.3): the old spellings of `edgecl server ...`.

`edgecl serve [options]` = `edgecl server start`, `serve register-device` = `server device add`,
`serve add-bundle` = `server bundle add`. Each prints a one-line note on stderr and runs the new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgecl.server.limits import DEFAULT_MAX_UPLOAD_MB

from . import server as new

serve_app = typer.Typer(help="Deprecated: use `edgecl server start` / `edgecl server device add` / "
                             "`edgecl server bundle add`.", no_args_is_help=False)


def _note(old: str, replacement: str) -> None:
    typer.echo(f"warning: `edgecl {old}` is deprecated and goes away in 0.3: use `edgecl {replacement}`", err=True)


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    db: new.DbOpt = None,
    store: new.StoreOpt = new.DEFAULT_STORE,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted delta upload, in MiB.")] = DEFAULT_MAX_UPLOAD_MB,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    workers: Annotated[int, typer.Option(help="API processes sharing the port and the store.")] = 1,
) -> None:
    """Deprecated: `edgecl server start`."""
    if ctx.invoked_subcommand is not None:
        return
    _note("serve", "server start")
    new.start(host=host, port=port, db=db, store=store, max_upload_mb=max_upload_mb, log_level=log_level,
              workers=workers)


@serve_app.command("register-device")
def register_device(
    name: Annotated[str, typer.Argument(help="Device name.")],
    admin: Annotated[bool, typer.Option("--admin", help="May also add bundles and merge.")] = False,
    db: new.DbOpt = None,
    store: new.StoreOpt = new.DEFAULT_STORE,
) -> None:
    """Deprecated: `edgecl server device add`."""
    _note("serve register-device", "server device add")
    new.device_add(name=name, admin=admin, db=db, store=store)


@serve_app.command("add-bundle")
def add_bundle(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    db: new.DbOpt = None,
    store: new.StoreOpt = new.DEFAULT_STORE,
) -> None:
    """Deprecated: `edgecl server bundle add`."""
    _note("serve add-bundle", "server bundle add")
    new.bundle_add(bundle=bundle, release=False, db=db, store=store)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
