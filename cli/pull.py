"""`edgecl pull` (device): fetch, verify and upgrade to the newest released bundle version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .device import ConfigOpt


def pull(
    bundle: Annotated[Path | None, typer.Argument(help="The bundle folder this device runs (default: the "
                                                       "config's bundle).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the new version (default: "
                                                                 "beside BUNDLE, NAME.vN).")] = None,
    server: Annotated[str, typer.Option(envvar="EDGECL_SERVER", help="Server URL (default: the config's).")] = "",
    token: Annotated[str, typer.Option(envvar="EDGECL_TOKEN", help="Device token (default: the config's).")] = "",
    server_key: Annotated[str, typer.Option("--server-key", help="Pinned server key (default: the "
                                                                 "config's).")] = "",
    retries: Annotated[int, typer.Option(help="Extra attempts per request on network errors.")] = 4,
    timeout_s: Annotated[float, typer.Option(help="Seconds per HTTP request.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Pull the newest signed version; the old bundle is left as it was on any failure."""
    from edgecl.device.pull import pull_configured
    from edgecl.http_client import RetryPolicy

    report = pull_configured(bundle, config, server, token, server_key, out,
                             RetryPolicy(retries=retries, timeout_s=timeout_s))
    typer.echo(json.dumps(report.__dict__, indent=2, default=str) if as_json else report.line())


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
