"""`edgecl restat` (device): this device's class statistics under the fleet's candidate backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .device import ConfigOpt

EXIT_NOT_TAKEN = 2


def restat(
    bundle: Annotated[Path | None, typer.Argument(help="The bundle folder this device runs (default: the "
                                                       "config's bundle).")] = None,
    server: Annotated[str, typer.Option(envvar="EDGECL_SERVER", help="Server URL (default: the config's).")] = "",
    token: Annotated[str, typer.Option(envvar="EDGECL_TOKEN", help="Device token (default: the config's).")] = "",
    server_key: Annotated[str, typer.Option("--server-key", help="Pinned server key (default: the "
                                                                 "config's).")] = "",
    device_id: Annotated[str | None, typer.Option(help="Device name (default: $EDGECL_DEVICE_ID, else the "
                                                      "device config's name).")] = None,
    key: Annotated[str | None, typer.Option(help="Device key, 64 hex digits (default: $EDGECL_DEVICE_KEY, else "
                                               "the device config's); signs the statistics.")] = None,
    retries: Annotated[int, typer.Option(help="Extra attempts per request on network errors.")] = 4,
    timeout_s: Annotated[float, typer.Option(help="Seconds per HTTP request.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Re-embed the images this device holds of its classes under the release candidate and push their
    statistics (no weight change, kilobytes). Exit 0 sent or nothing to do, 2 the server refused them."""
    from edgecl.device.restat import restat_configured
    from edgecl.http_client import RetryPolicy

    report = restat_configured(bundle, config, server, token, server_key, device_id, key,
                               RetryPolicy(retries=retries, timeout_s=timeout_s))
    typer.echo(json.dumps(report.__dict__, indent=2) if as_json else report.line())
    if report.status not in ("sent", "no_candidate", "other_version", "nothing_held"):
        raise typer.Exit(code=EXIT_NOT_TAKEN)


def register(app: typer.Typer) -> None:
    app.command("restat")(restat)
