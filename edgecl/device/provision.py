"""The device's config file: who this device is to the fleet server (``edgecl device init``).

One TOML file, by default ``~/.config/edgecl/device.toml`` (``--config PATH`` or
``$EDGECL_DEVICE_CONFIG``), written atomically with mode 0600 (it holds the device's token and
signing key). ``edgecl delta``, ``push``, ``pull``, ``adapt``, ``eval``, ``predict`` and ``rollback`` read it (the
bundle and the profile are their defaults); their flags and arguments override it. ``edgecl device
init`` checks the token and the pinned server key against the server when it answers.

    server = "http://fleet.local:8750"    # the fleet server
    name = "line3-cam1"                   # the registered device name: every delta's device_id
    token = "ecl_..."                     # bearer token (edgecl server device add prints it)
    key = "64 hex digits"                 # HMAC key that signs this device's deltas
    server_key = "64 hex digits"          # the server's release public key, pinned (edgecl server key)
    profile = "devices/x86.toml"          # optional device profile
    bundle = "/srv/edgecl/bundle"         # optional: the bundle folder this device runs (pull updates it)
    outbox = "/srv/edgecl/outbox"         # optional: where unsent deltas wait
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgecl.errors import ConfigError
from edgecl.formats.delta import MERGE_DEVICE_ID, NAME_RE, parse_key
from edgecl.formats.signing import parse_public_key, write_secret

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "EDGECL_DEVICE_CONFIG"
DEFAULT_CONFIG = "~/.config/edgecl/device.toml"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class DeviceConfig:
    server: str = ""          # fleet server URL, http(s)://HOST:PORT
    name: str = ""            # the device's registered name (delta device_id)
    token: str = ""           # bearer token for the server
    key: str = ""             # HMAC-SHA256 key, 64 hex digits, signs deltas
    server_key: str = ""      # the server's Ed25519 release public key, 64 hex digits (pinned)
    profile: str = ""         # device profile .toml ("" = the default profile)
    bundle: str = ""          # the bundle folder this device runs ("" = pass it on the command line)
    outbox: str = ""          # outbox folder ("" = ~/.edgecl/outbox)
    source: str = ""          # the file this came from (set by the loader, not written)


def config_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()


def check_config(cfg: DeviceConfig) -> DeviceConfig:
    """Every value well-formed (what init writes and what load reads), else a ConfigError naming it."""
    where = cfg.source or "the device config"
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if not isinstance(value, str) or _CONTROL.search(value):
            raise ConfigError(f"{where}: {field.name} is not a one-line string", "run `edgecl device init` again")
    if cfg.server and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", cfg.server):
        raise ConfigError(f"{where}: server {cfg.server!r} is not an http(s) URL", "pass --server http://HOST:PORT")
    if cfg.name and (not NAME_RE.fullmatch(cfg.name) or cfg.name == MERGE_DEVICE_ID):
        raise ConfigError(f"{where}: name {cfg.name!r} is not a device name",
                          "use the name the device was registered with (edgecl server device add NAME)")
    if cfg.key:
        try:
            parse_key(cfg.key)
        except Exception as exc:
            raise ConfigError(f"{where}: key is not 64 hex digits", "copy the key `edgecl server device add` "
                              "printed") from exc
    if cfg.server_key:
        try:
            parse_public_key(cfg.server_key)
        except Exception as exc:
            raise ConfigError(f"{where}: server_key is not 64 hex digits",
                              "copy the key `edgecl server key` prints on the server") from exc
    return cfg


def make_device_config(server: str, name: str, token: str, key: str, profile: str = "", server_key: str = "",
                       bundle: str = "", outbox: str = "") -> DeviceConfig:
    """The config ``edgecl device init`` writes, checked (a ConfigError names a bad value)."""
    if not (server and name and token and key):
        raise ConfigError("device init needs --server, --name, --token and --key",
                          "pass the values `edgecl server device add NAME` printed")
    return check_config(DeviceConfig(server=server.rstrip("/"), name=name, token=token.strip(), key=key.strip(),
                                     server_key=server_key.strip().lower(), profile=str(profile or ""),
                                     bundle=str(Path(bundle).resolve()) if bundle else "",
                                     outbox=str(Path(outbox).resolve()) if outbox else ""))


def init_device(path: str | Path | None, server: str, name: str, token: str, key: str, profile: str = "",
                server_key: str = "", bundle: str = "", outbox: str = "") -> Path:
    """Write the device config (atomic, mode 0600); returns its path. An existing file is replaced
    (re-provisioning after `edgecl server device rotate` is the same command). No network: the
    CLI asks the server first (:func:`check_with_server`)."""
    cfg = make_device_config(server, name, token, key, profile, server_key, bundle, outbox)
    target = config_path(path)
    save_device_config(cfg, target)
    return target


def check_with_server(cfg: DeviceConfig, timeout_s: float = 5.0) -> str:
    """Ask the server whether ``cfg``'s token is valid and its pinned key is the server's.

    Returns "checked" (both right), or "unreachable: <why>" when no answer came: provisioning may
    happen before the server is up, so that is not an error. A token the server refuses, or a
    pinned key that is not the server's, is a ConfigError now rather than at the first push or pull.
    """
    from edgecl.http_client import RetryPolicy, ServerRejected, ServerUnreachable, api_json

    policy = RetryPolicy(retries=0, timeout_s=timeout_s)
    try:
        # Any call a device token may make and that changes nothing: the releases it can see.
        api_json(cfg.server, cfg.token, "GET", "/v1/releases", policy=policy)
        served_key = api_json(cfg.server, "", "GET", "/v1/server-key", policy=policy).get("public_key", "")
    except ServerUnreachable as exc:
        return f"unreachable: {exc.problem}"
    except ServerRejected as exc:
        if exc.status in (401, 403):
            raise ConfigError(f"the server {cfg.server} refuses this token ({exc.code})",
                              f"pass the token `edgecl server device add {cfg.name}` printed (or `edgecl server "
                              f"device rotate {cfg.name}` for a new one)") from None
        raise
    if cfg.server_key and served_key and served_key.lower() != cfg.server_key.lower():
        raise ConfigError(f"--server-key is not the key {cfg.server} signs releases with",
                          "copy the key `edgecl server key` prints on the server")
    return "checked"


def save_device_config(cfg: DeviceConfig, path: str | Path) -> None:
    lines = ["# edgecl device config (edgecl device init); holds this device's secrets: keep it mode 0600"]
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name != "source" and value:
            # A JSON string is a TOML basic string (same escapes); control characters were refused.
            lines.append(f"{field.name} = {json.dumps(value, ensure_ascii=False)}")
    write_secret(path, ("\n".join(lines) + "\n").encode("utf-8"))


def load_device_config(path: str | Path | None = None, required: bool = False) -> DeviceConfig | None:
    """The config at ``path`` / $EDGECL_DEVICE_CONFIG / the default; None if there is none (unless
    ``required``). Unknown keys are warned about; bad values are a ConfigError."""
    target = config_path(path)
    try:
        data = tomllib.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required or path is not None:
            raise ConfigError(f"no device config at {target}",
                              "run `edgecl device init --server URL --name NAME --token T --key K`") from None
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the device config {target} ({exc})", "run `edgecl device init` again") from exc
    known = {f.name for f in dataclasses.fields(DeviceConfig)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{target}: unknown device config keys ignored: {', '.join(unknown)}", stacklevel=2)
    if os.name == "posix" and target.stat().st_mode & 0o077:
        warnings.warn(f"{target} is readable by other users (it holds the device's token and key): "
                      f"chmod 600 {target}", stacklevel=2)
    return check_config(DeviceConfig(**{k: v for k, v in data.items() if k in known}, source=str(target)))


def set_bundle(path: str | Path | None, bundle: str | Path) -> None:
    """Point the config at another bundle folder (after `edgecl pull` upgraded to it)."""
    cfg = load_device_config(path, required=True)
    assert cfg is not None
    cfg.bundle = str(Path(bundle).resolve())
    save_device_config(cfg, config_path(cfg.source))
