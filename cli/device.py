"""`edgecl device init`: provision this device (server, name, token, key, pinned server key).

Also the device commands' defaults from that config: the bundle this device runs and its profile,
so `edgecl adapt --data DIR`, `eval`, `predict`, `delta` and `rollback` need no BUNDLE argument
once `device init --bundle DIR` (or `pull`) has set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from edgecl.device.provision import DeviceConfig

device_app = typer.Typer(help="This device's identity toward the fleet server.", no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", envvar="EDGECL_DEVICE_CONFIG",
                                                help="Device config file (default ~/.config/edgecl/device.toml).")]
BundleArg = Annotated[Path | None, typer.Argument(metavar="BUNDLE", show_default=False,
                                                  help="Bundle folder (default: the device config's bundle).")]
DeviceOpt = Annotated[Path | None, typer.Option("--device", help="Device profile (.toml); default: the device "
                                                                 "config's, else the bundle's.")]


def device_config(config: Path | None, required: bool = False) -> DeviceConfig | None:
    """The device config, or None when there is none and none is needed."""
    from edgecl.device.provision import config_path, load_device_config

    if not required and not config_path(config).is_file():
        return None  # a bundle given on the command line needs no config, even one $EDGECL_DEVICE_CONFIG names
    return load_device_config(config, required=required)


def resolve_bundle(bundle: Path | None, config: Path | None) -> tuple[Path, DeviceConfig | None]:
    """BUNDLE as given, else the device config's bundle; with the config (None when there is none)."""
    from edgecl.errors import ConfigError

    cfg = device_config(config, required=False)
    if bundle is not None:
        return bundle, cfg
    if cfg is None or not cfg.bundle:
        raise ConfigError("no bundle given and no device config names one",
                          "pass the bundle folder, or run `edgecl device init ... --bundle DIR` once")
    return Path(cfg.bundle), cfg


def resolve_profile(device: Path | None, cfg: DeviceConfig | None) -> Path | None:
    """--device as given, else the device config's profile, else None (the bundle's own)."""
    if device is not None:
        return device
    return Path(cfg.profile) if cfg is not None and cfg.profile else None


def bundle_words(bundle: Path, cfg: DeviceConfig | None) -> str:
    """How a next-step hint names the bundle: nothing when the config's bundle is this one."""
    if cfg is not None and cfg.bundle and Path(cfg.bundle).resolve() == bundle.resolve():
        return ""
    return f" {bundle}"


@device_app.command("init")
def init(
    server: Annotated[str, typer.Option(help="Fleet server URL, e.g. http://fleet.local:8750.")],
    name: Annotated[str, typer.Option(help="The device's registered name (edgecl server device add NAME).")],
    token: Annotated[str, typer.Option(help="The device's token (printed by `edgecl server device add`).")],
    key: Annotated[str, typer.Option(help="The device's key, 64 hex digits (printed with the token).")],
    server_key: Annotated[str, typer.Option("--server-key", help="The server's release public key (`edgecl "
                                                                 "server key`): `edgecl pull` verifies with it.")] = "",
    profile: Annotated[str, typer.Option(help="Device profile (.toml).")] = "",
    bundle: Annotated[str, typer.Option(help="The bundle folder this device runs: the default BUNDLE of adapt, "
                                             "eval, predict, delta, rollback (`pull` moves it on).")] = "",
    outbox: Annotated[str, typer.Option(help="Outbox folder for deltas that could not be sent.")] = "",
    check: Annotated[bool, typer.Option("--check/--no-check", help="Ask the server whether the token and the "
                                                                   "server key are right (when it answers).")] = True,
    config: ConfigOpt = None,
) -> None:
    """Write the device config (mode 0600); the device commands read it, flags override it."""
    from edgecl.device.provision import check_with_server, config_path, make_device_config, save_device_config

    cfg = make_device_config(server, name, token, key, profile=profile, server_key=server_key, bundle=bundle,
                             outbox=outbox)
    checked = check_with_server(cfg) if check else "not checked (--no-check)"
    path = config_path(config)
    save_device_config(cfg, path)
    if checked == "checked":
        said = "token accepted by the server" + (", server key matches" if server_key else "")
    else:
        said = f"token {checked}"
    typer.echo(f"wrote {path}: device {name}, server {cfg.server} ({said})"
               + ("" if server_key else "; NO server key: `edgecl pull` will refuse until you pass --server-key"))
    data = "edgecl adapt --data DIR" if cfg.bundle else "edgecl adapt BUNDLE --data DIR"
    typer.echo(f"next: {data}   (new classes: one sub-folder of images per class)")


def register(app: typer.Typer) -> None:
    app.add_typer(device_app, name="device")
