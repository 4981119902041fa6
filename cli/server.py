"""`edgecl server`: run the fleet server and administer its store (devices, bundles, releases, key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgecl.server.limits import DEFAULT_BODY_IDLE_S, DEFAULT_MAX_UPLOAD_MB

server_app = typer.Typer(help="Run the fleet server (start) or administer its store.", no_args_is_help=True)
device_app = typer.Typer(help="Devices: add, list, revoke, rotate.", no_args_is_help=True)
bundle_app = typer.Typer(help="Bundle versions: add (store whole), list.", no_args_is_help=True)
release_app = typer.Typer(help="Releases: list, promote a canary release to every device.", no_args_is_help=True)

StoreOpt = Annotated[Path, typer.Option("--store", envvar="EDGECL_SERVER_STORE",
                                        help="Folder for the stored files (and the SQLite database).")]
DbOpt = Annotated[str | None, typer.Option("--db", envvar="EDGECL_SERVER_DB",
                                              help="Database URL: sqlite:///PATH (default: STORE/edgecl.sqlite3) "
                                                   "or postgresql://USER@HOST:PORT/DB.")]
BlobsOpt = Annotated[str | None, typer.Option("--blobs", envvar="EDGECL_SERVER_BLOBS",
                                               help="Where bytes live: folder (STORE/blobs, default) or database "
                                                    "(PostgreSQL: replicas share nothing but the database).")]
KeyFileOpt = Annotated[Path | None, typer.Option("--release-key-file", envvar="EDGECL_RELEASE_KEY_FILE",
                                                 help="The release signing key (64 hex digits) every replica "
                                                      "reads; default STORE/release.key (or $EDGECL_RELEASE_KEY).")]
DEFAULT_STORE = Path("~/.edgecl/server")


def _store(store: Path, db: str | None, blobs: str | None = None,
           release_key_file: Path | None = None):  # noqa: ANN202 - edgecl.server.store.Store
    from edgecl.server.store import Store

    return Store(store, db, blobs, release_key_file)


@server_app.command("start")
def start(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    blobs: BlobsOpt = None,
    release_key_file: KeyFileOpt = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted delta upload, in MiB.")] = DEFAULT_MAX_UPLOAD_MB,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    workers: Annotated[int, typer.Option(help="API processes sharing the port and the store.")] = 1,
    header_timeout_s: Annotated[float, typer.Option(help="Seconds a client has to send a request head.")] = 10.0,
    body_idle_s: Annotated[float, typer.Option(help="Longest pause inside a request body, in seconds.")] = DEFAULT_BODY_IDLE_S,
    keep_alive_s: Annotated[int, typer.Option(help="Idle keep-alive connections close after this.")] = 5,
    max_connections_per_client: Annotated[int, typer.Option(help="Open connections per client address and "
                                                                 "process (0: no cap; behind a proxy).")] = 64,
    max_connections: Annotated[int, typer.Option(help="Connections or requests in flight per process before "
                                                      "503.")] = 1024,
) -> None:
    """Serve the HTTP API (docs/server.md) until interrupted."""
    from edgecl.server.app import serve

    serve(host=host, port=port, db=db, store_dir=str(store), max_upload_mb=max_upload_mb, log_level=log_level,
          workers=workers, header_timeout_s=header_timeout_s, body_idle_s=body_idle_s, keep_alive_s=keep_alive_s,
          max_connections_per_client=max_connections_per_client, max_connections=max_connections, blobs=blobs,
          release_key_file=str(release_key_file) if release_key_file else None)


@server_app.command("key")
def key(db: DbOpt = None, store: StoreOpt = DEFAULT_STORE, blobs: BlobsOpt = None,
        release_key_file: KeyFileOpt = None,
        new: Annotated[Path | None, typer.Option("--new", help="Write a new release key to this file (mode 0600, "
                                                                "refused if it exists) and print its public key: "
                                                                "for --release-key-file (docs/server.md#release-key).")]
        = None) -> None:
    """Print the public key releases are signed with (give it to `edgecl device init --server-key`)."""
    from edgecl.errors import EdgeclError

    if new is not None:
        from edgecl.formats.signing import generate_private_key, public_key, write_secret

        if new.exists():
            typer.echo(f"error: {new} exists: a key file is never overwritten; pick a new path", err=True)
            raise typer.Exit(1)
        seed = generate_private_key()
        write_secret(new, seed.hex().encode() + b"\n")
        typer.echo(public_key(seed).hex())
        return
    try:
        typer.echo(_store(store, db, blobs, release_key_file).release_public_key())
    except EdgeclError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(help="Device name (letters, digits, '.', '_', '-').")],
    admin: Annotated[bool, typer.Option("--admin", help="May also add bundles, merge, release, list devices.")]
    = False,
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Register a device; prints its token (for push/pull) and key (signs its deltas), shown only once."""
    token, hex_key = _store(store, db).register_device(name, admin=admin)
    typer.echo(f"device {name}{' (admin)' if admin else ''}")
    typer.echo(f"token  {token}")
    typer.echo(f"key    {hex_key}")
    typer.echo("Keep both secret: the server keeps only the token's hash and cannot show them again.")


@device_app.command("list")
def device_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                db: DbOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Devices: role, version, last seen, last held-out accuracy, revoked."""
    rows = _store(store, db).list_devices()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        after = (r["last_heldout"] or {}).get("after", {}).get("accuracy")
        typer.echo(f"{r['name']:<24} {r['role']:<6} {(r['last_bundle'] + ' v' + str(r['last_version'])) if r['last_version'] else '-':<20} "
                   f"seen {r['last_seen_utc'] or 'never':<20} {r['last_event'] or '-':<8} "
                   f"acc {'-' if after is None else f'{after:.3f}'}{'  REVOKED' if r['revoked'] else ''}")


@device_app.command("revoke")
def device_revoke(name: Annotated[str, typer.Argument(help="Device name.")], db: DbOpt = None,
                  store: StoreOpt = DEFAULT_STORE) -> None:
    """Refuse the device's token from now on (403 device_revoked); its stored deltas stay."""
    _store(store, db).revoke_device(name)
    typer.echo(f"revoked {name}")


@device_app.command("rotate")
def device_rotate(name: Annotated[str, typer.Argument(help="Device name.")], db: DbOpt = None,
                  store: StoreOpt = DEFAULT_STORE) -> None:
    """New token and key for a device (the old ones stop working; a revocation is lifted)."""
    token, hex_key = _store(store, db).rotate_device(name)
    typer.echo(f"device {name}")
    typer.echo(f"token  {token}")
    typer.echo(f"key    {hex_key}")
    typer.echo("Re-provision the device with them: edgecl device init ... --token T --key K")


@bundle_app.command("add")
def bundle_add(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgecl export` or `edgecl apply`.")],
    release: Annotated[bool, typer.Option("--release", help="Also release it (signed): devices may pull it.")]
    = False,
    server: Annotated[str, typer.Option(help="Upload to this server over HTTP instead of writing the store "
                                             "(needs --token).")] = "",
    token: Annotated[str, typer.Option(envvar="EDGECL_ADMIN_TOKEN", help="An admin token (with --server).")] = "",
    db: DbOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    blobs: BlobsOpt = None,
    release_key_file: KeyFileOpt = None,
) -> None:
    """Store a whole bundle version (every file by sha256) so devices can push deltas for it."""
    from edgecl.server.service import release_version
    from edgecl.server.store import add_bundle_dir

    if server:
        from edgecl.http_client import api_json
        from edgecl.release import upload_bundle

        row, sent = upload_bundle(server, token, bundle)
        typer.echo(f"stored on {server}: bundle {row['bundle_id']} v{row['version']} (K={row['delta_k']}); "
                   f"uploaded {sent:,} B")
        if release:
            api_json(server, token, "POST", "/v1/releases", {"bundle_id": row["bundle_id"], "version": row["version"]})
            typer.echo(f"released: {row['bundle_id']} v{row['version']}")
        return
    s = _store(store, db, blobs, release_key_file)
    info, new = add_bundle_dir(s, bundle)
    files = s.bundle_files(info.bundle_id, info.version)
    typer.echo(f"{'added' if new else 'already registered'}: bundle {info.bundle_id} v{info.version} "
               f"(K={info.delta_k}, mask {info.mask_sha256[:12]}, "
               f"{len(files)} files, {sum(f['size_bytes'] for f in files.values()):,} B stored)")
    if release:
        result = release_version(s, info.bundle_id, info.version)
        typer.echo(f"{result['status'].replace('_', ' ')}: {info.bundle_id} v{info.version}")


@bundle_app.command("list")
def bundle_list(db: DbOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Registered bundle versions: stored whole or not, released or not."""
    s = _store(store, db)
    released = {(r["bundle_id"], r["version"]): r for r in s.list_releases()}
    for b in s.list_bundles():
        files = s.bundle_files(b.bundle_id, b.version)
        rel = released.get((b.bundle_id, b.version))
        status = ("released" + (f" (canary: {', '.join(rel['canary'])})" if rel["canary"] else "")) if rel else "-"
        typer.echo(f"{b.bundle_id:<24} v{b.version:<4} K={b.delta_k:<9} "
                   f"{'stored' if files else 'registered'}  {status}")


@release_app.command("list")
def release_list(db: DbOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Released versions and who may pull them."""
    for r in _store(store, db).list_releases():
        typer.echo(f"{r['bundle_id']:<24} v{r['version']:<4} {r['released_utc']}  "
                   f"{'canary: ' + ', '.join(r['canary']) if r['canary'] else 'every device'}")


@release_app.command("promote")
def release_promote(bundle_id: Annotated[str, typer.Argument(help="Bundle id.")],
                    version: Annotated[int, typer.Argument(help="Released version.")],
                    db: DbOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Make a canary release pullable by every device."""
    _store(store, db).promote_release(bundle_id, version)
    typer.echo(f"promoted {bundle_id} v{version}: every device may pull it")


server_app.add_typer(device_app, name="device")
server_app.add_typer(bundle_app, name="bundle")
server_app.add_typer(release_app, name="release")


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
