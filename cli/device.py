"""`edgecl device init`: provision this device (server, name, token, key, pinned server key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

device_app = typer.Typer(help="This device's identity toward the fleet server.", no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", envvar="EDGECL_DEVICE_CONFIG",
                                                help="Device config file (default ~/.config/edgecl/device.toml).")]


@device_app.command("init")
def init(
    server: Annotated[str, typer.Option(help="Fleet server URL, e.g. http://fleet.local:8750.")],
    name: Annotated[str, typer.Option(help="The device's registered name (edgecl server device add NAME).")],
    token: Annotated[str, typer.Option(help="The device's token (printed by `edgecl server device add`).")],
    key: Annotated[str, typer.Option(help="The device's key, 64 hex digits (printed with the token).")],
    server_key: Annotated[str, typer.Option("--server-key", help="The server's release public key (`edgecl "
                                                                 "server key`): `edgecl pull` verifies with it.")] = "",
    profile: Annotated[str, typer.Option(help="Device profile (.toml).")] = "",
    bundle: Annotated[str, typer.Option(help="The bundle folder this device runs (`edgecl pull` moves it on).")] = "",
    outbox: Annotated[str, typer.Option(help="Outbox folder for deltas that could not be sent.")] = "",
    config: ConfigOpt = None,
) -> None:
    """Write the device config (mode 0600); `delta`, `push` and `pull` read it, flags override it."""
    from edgecl.device.provision import init_device

    path = init_device(config, server, name, token, key, profile=profile, server_key=server_key, bundle=bundle,
                       outbox=outbox)
    typer.echo(f"wrote {path} (device {name}, server {server.rstrip('/')}"
               f"{', server key pinned' if server_key else ', NO server key: `edgecl pull` will refuse'})")


def register(app: typer.Typer) -> None:
    app.add_typer(device_app, name="device")
