"""`edgecl serve`: the fleet server, and its admin commands (register a device, add a bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

serve_app = typer.Typer(help="Run the fleet server (HTTP) or administer its store.", no_args_is_help=False)

StoreOpt = Annotated[Path, typer.Option("--store", envvar="EDGECL_SERVER_STORE",
                                        help="Folder for the stored files (and the SQLite database).")]
DbOpt = Annotated[str | None, typer.Option("--db", envvar="EDGECL_SERVER_DB",
                                              help="Database URL: sqlite:///PATH (default: STORE/edgecl.sqlite3) "
                                                   "or postgresql://USER@HOST:PORT/DB.")]
DEFAULT_STORE = Path("~/.edgecl/server")


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted delta upload, in MiB.")] = 16.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    workers: Annotated[int, typer.Option(help="API processes sharing the port and the store.")] = 1,
) -> None:
    """Serve the HTTP API (docs/server.md) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from edgecl.server.app import serve as run_server

    run_server(host=host, port=port, db=db, store_dir=str(store), max_upload_mb=max_upload_mb, log_level=log_level,
               workers=workers)


@serve_app.command("register-device")
def register_device(
    name: Annotated[str, typer.Argument(help="Device name (letters, digits, '.', '_', '-').")],
    admin: Annotated[bool, typer.Option("--admin", help="May also add bundles and merge.")] = False,
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Register a device; prints its token (for push) and key (signs its deltas), shown only once."""
    from edgecl.server.store import Store

    token, key = Store(store, db).register_device(name, admin=admin)
    typer.echo(f"device {name}{' (admin)' if admin else ''}")
    typer.echo(f"token  {token}")
    typer.echo(f"key    {key}")
    typer.echo("Keep both secret: the server keeps only the token's hash and cannot show them again.")


@serve_app.command("add-bundle")
def add_bundle(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgecl export` (manifest.json, "
                                                "mask.safetensors).")],
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Make a bundle version known to the server, so devices can push deltas for it."""
    from edgecl.server.store import Store, add_bundle_dir

    info, new = add_bundle_dir(Store(store, db), bundle)
    typer.echo(f"{'added' if new else 'already registered'}: bundle {info.bundle_id} v{info.version} "
               f"(K={info.delta_k}, mask {info.mask_sha256[:12]})")


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
