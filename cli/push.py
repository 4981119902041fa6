"""`edgecl push`: send deltas to the fleet server; offline ones wait in the outbox."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgecl.errors import EdgeclError

from .device import ConfigOpt


def push(
    deltas: Annotated[list[Path] | None, typer.Argument(help="Delta files written by `edgecl delta`.")] = None,
    server: Annotated[str, typer.Option("--server", envvar="EDGECL_SERVER",
                                        help="Server URL (default: the device config's).")] = "",
    token: Annotated[str, typer.Option("--token", envvar="EDGECL_TOKEN",
                                       help="This device's token (default: the device config's).")] = "",
    outbox: Annotated[bool, typer.Option("--outbox", help="Send the deltas waiting in the outbox.")] = False,
    outbox_dir: Annotated[Path | None, typer.Option(envvar="EDGECL_OUTBOX",
                                                       help="Outbox folder (default: the config's, else "
                                                            "~/.edgecl/outbox).")] = None,
    retries: Annotated[int, typer.Option(help="Extra attempts per delta on network errors.")] = 4,
    timeout_s: Annotated[float, typer.Option(help="Seconds per HTTP request.")] = 30.0,
    config: ConfigOpt = None,
) -> None:
    """Push DELTA files (and/or the outbox). Exit 0 sent or already there, 2 rejected, 3 unreachable."""
    from edgecl.device.provision import load_device_config
    from edgecl.device.push import exit_code, flush_outbox, push_files
    from edgecl.http_client import RetryPolicy

    if not deltas and not outbox:
        raise EdgeclError("nothing to push", "name delta files or pass --outbox")
    cfg = load_device_config(config)
    server = server or (cfg.server if cfg else "")
    token = token or (cfg.token if cfg else "")
    outbox_dir = outbox_dir or (Path(cfg.outbox) if cfg and cfg.outbox else None)
    if not server or not token:
        raise EdgeclError("no server or token", "run `edgecl device init`, or pass --server URL --token T "
                          "(or set EDGECL_SERVER, EDGECL_TOKEN)")
    policy = RetryPolicy(retries=retries, timeout_s=timeout_s)
    results = flush_outbox(server, token, outbox_dir, policy) if outbox else []
    if deltas:
        results += push_files(deltas, server, token, outbox_dir, policy)
    if not results:
        typer.echo("outbox empty: nothing to send")
    for result in results:
        typer.echo(result.line(), err=result.status in ("rejected", "unreachable"))
    code = exit_code(results)
    if code == 0 and results:
        typer.echo("next: on the host, `edgecl release BUNDLE --heldout DIR` merges the fleet's deltas and "
                   "publishes the next version if it is not worse")
    elif any(r.status == "unreachable" for r in results):
        typer.echo("next: `edgecl push --outbox` sends what waits in the outbox once the server answers", err=True)
    raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
