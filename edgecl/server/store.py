"""Server storage: a SQL database (SQLite or PostgreSQL) for rows + a folder for bytes.

- Bytes (deltas, masks, manifests, overlap files) live in ``STORE/blobs/ab/<sha256>``, named by
  their sha256: the same bytes are stored once, and a name can never be a path chosen by a client.
  Each blob is written atomically (temp file, fsync, rename, folder fsync) BEFORE its row is
  committed, so a row never points at missing bytes; a crash in between leaves only an orphan
  blob that the retried push reuses.
- Rows are committed (SQLite: WAL + synchronous=FULL; PostgreSQL: autocommit) before the API
  answers 2xx, so an acknowledged delta survives kill -9 and power loss.
- Device tokens are stored as sha256 (tokens are 256-bit random, so a plain hash is enough: no
  dictionary to guess from); HMAC keys must be readable to verify signatures, so the database
  itself is a secret (file mode 0600 for SQLite).

For several API processes (behind a load balancer) use PostgreSQL and a ``--store`` folder that
every process mounts (NFS, a shared volume): the processes keep no state of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.delta import MERGE_DEVICE_ID, NAME_RE

SHA_RE = re.compile(r"[0-9a-f]{64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    hmac_key TEXT NOT NULL,
    role TEXT NOT NULL,
    created_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_sha256 TEXT NOT NULL,
    mask_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    delta_k BIGINT NOT NULL,
    embedding_dim BIGINT NOT NULL,
    created_utc TEXT NOT NULL,
    PRIMARY KEY (bundle_id, version)
);
CREATE TABLE IF NOT EXISTS deltas (
    sha256 TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    device TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    steps BIGINT NOT NULL,
    samples_seen BIGINT NOT NULL,
    values_dtype TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    received_ns BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS deltas_by_bundle ON deltas (bundle_id, version, device);
CREATE TABLE IF NOT EXISTS merges (
    sha256 TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    overlap_sha256 TEXT NOT NULL,
    inputs BIGINT NOT NULL,
    strategy TEXT NOT NULL,
    created_ns BIGINT NOT NULL
);
"""


class StoreError(EdgeclError):
    """The database or the blob folder cannot be used as asked."""


@dataclass
class Device:
    name: str
    role: str            # "device" (may push) or "admin" (may also add bundles and merge)
    hmac_key: bytes


@dataclass
class Bundle:
    bundle_id: str
    version: int
    base_sha256: str
    mask_sha256: str
    manifest_sha256: str
    delta_k: int
    embedding_dim: int
    created_utc: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """One store = one database + one blob folder. Thread-safe: one DB connection per thread."""

    def __init__(self, store_dir: str | Path, db_url: str | None = None) -> None:
        self.root = Path(store_dir).expanduser()
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {self.root} ({exc.strerror})",
                             "pass a writable --store folder") from exc
        self.db_url = db_url or f"sqlite:///{self.root / 'edgecl.sqlite3'}"
        if self.db_url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
        elif self.db_url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self._sqlite_path = Path(self.db_url[len("sqlite:///"):])
        else:
            raise StoreError(f"unsupported database URL {self.db_url.split(':', 1)[0]}://...",
                             "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._pending: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        with self._cursor() as cur:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                cur.execute(statement)
        if self.dialect == "sqlite":
            with contextlib.suppress(OSError):
                os.chmod(self._sqlite_path, 0o600)     # it holds the devices' HMAC keys

    # -- connections ---------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): every statement is its own committed transaction.
            conn = sqlite3.connect(self._sqlite_path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")       # readers never block the writer
            conn.execute("PRAGMA synchronous=FULL")        # a commit is on disk before we answer 2xx
            conn.execute("PRAGMA busy_timeout=60000")
            return conn
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError("PostgreSQL support needs psycopg", "pip install 'edgecl[server]'") from exc
        try:
            return psycopg.connect(self.db_url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL ({str(exc).strip().splitlines()[0]})",
                             "check --db (postgresql://USER@HOST:PORT/DB) and that the server is running") from exc

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._all.append(conn)
        cur = conn.cursor()
        try:
            yield _Cursor(cur, self.dialect)
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- blobs -----------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        if not SHA_RE.fullmatch(sha256):     # never build a path from anything but a sha256
            raise StoreError(f"{sha256[:80]!r} is not a sha256", "use the 64-hex-digit id the server returned")
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, data: bytes, sha256: str | None = None) -> str:
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not (path.exists() and path.stat().st_size == len(data)):
            atomic_write_bytes(path, data)
        return sha256

    def get_blob(self, sha256: str) -> bytes | None:
        try:
            return self.blob_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    # -- devices ---------------------------------------------------------------------------------------
    def register_device(self, name: str, admin: bool = False) -> tuple[str, str]:
        """Create a device; returns (token, hex key), shown once: only the token's hash is kept."""
        if not NAME_RE.fullmatch(name) or name == MERGE_DEVICE_ID:
            raise StoreError(f"{name!r} is not a valid device name",
                             "use letters, digits, '.', '_', '-' (at most 64, not 'merge')")
        token = "ecl_" + secrets.token_urlsafe(32)
        key = secrets.token_hex(32)
        with self._cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_sha256, hmac_key, role, created_utc) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (name) DO NOTHING",
                        (name, token_sha256(token), key, "admin" if admin else "device", _utc()))
            if cur.rowcount != 1:
                raise StoreError(f"device {name!r} is already registered", "choose another name")
        return token, key

    def device_for_token(self, token: str) -> Device | None:
        with self._cursor() as cur:
            cur.execute("SELECT name, role, hmac_key FROM devices WHERE token_sha256 = ?", (token_sha256(token),))
            row = cur.fetchone()
        return Device(row[0], row[1], bytes.fromhex(row[2])) if row else None

    def merge_key(self) -> bytes:
        """The server's own signing key for merged deltas (device id "merge"), made on first use."""
        with self._cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_sha256, hmac_key, role, created_utc) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (name) DO NOTHING",
                        (MERGE_DEVICE_ID, token_sha256(secrets.token_hex(32)), secrets.token_hex(32), "merge", _utc()))
            cur.execute("SELECT hmac_key FROM devices WHERE name = ?", (MERGE_DEVICE_ID,))
            return bytes.fromhex(cur.fetchone()[0])

    # -- bundles ---------------------------------------------------------------------------------------
    def add_bundle(self, bundle: Bundle, manifest_bytes: bytes, mask_bytes: bytes) -> bool:
        """Register a bundle version; False if it was already there with the same hashes."""
        self.put_blob(manifest_bytes, bundle.manifest_sha256)
        self.put_blob(mask_bytes, bundle.mask_sha256)
        with self._cursor() as cur:
            cur.execute("INSERT INTO bundles (bundle_id, version, base_sha256, mask_sha256, manifest_sha256, delta_k, "
                        "embedding_dim, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (bundle_id, version) DO NOTHING",
                        (bundle.bundle_id, bundle.version, bundle.base_sha256, bundle.mask_sha256,
                         bundle.manifest_sha256, bundle.delta_k, bundle.embedding_dim, bundle.created_utc))
            if cur.rowcount == 1:
                return True
        known = self.get_bundle(bundle.bundle_id, bundle.version)
        assert known is not None
        if (known.base_sha256, known.mask_sha256) != (bundle.base_sha256, bundle.mask_sha256):
            raise StoreError(f"bundle {bundle.bundle_id} v{bundle.version} is already registered with other "
                             "weights or mask", "export the changed bundle as a new version")
        return False

    def get_bundle(self, bundle_id: str, version: int) -> Bundle | None:
        with self._cursor() as cur:
            cur.execute("SELECT bundle_id, version, base_sha256, mask_sha256, manifest_sha256, delta_k, embedding_dim, "
                        "created_utc FROM bundles WHERE bundle_id = ? AND version = ?", (bundle_id, version))
            row = cur.fetchone()
        return Bundle(*row) if row else None

    def list_bundles(self) -> list[Bundle]:
        with self._cursor() as cur:
            cur.execute("SELECT bundle_id, version, base_sha256, mask_sha256, manifest_sha256, delta_k, embedding_dim, "
                        "created_utc FROM bundles ORDER BY bundle_id, version")
            return [Bundle(*row) for row in cur.fetchall()]

    # -- deltas ----------------------------------------------------------------------------------------
    def put_delta(self, data: bytes, sha256: str, row: dict[str, Any]) -> bool:
        """Store an accepted delta durably; False when these exact bytes were already stored."""
        self.put_blob(data, sha256)
        sql = ("INSERT INTO deltas (sha256, bundle_id, version, device, size_bytes, steps, samples_seen, "
               "values_dtype, created_utc, received_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (sha256) DO NOTHING")
        args = (sha256, row["bundle_id"], row["version"], row["device"], len(data), row["steps"],
                row["samples_seen"], row["values_dtype"], row["created_utc"], time.time_ns())
        if self.dialect == "sqlite":
            return self._group_commit(sql, args) == 1
        with self._cursor() as cur:     # PostgreSQL batches concurrent commits' WAL flushes itself
            cur.execute(sql, args)
            return cur.rowcount == 1

    def _group_commit(self, sql: str, args: tuple) -> int:
        """Run one INSERT inside a transaction shared with the other inserts waiting right now.

        SQLite serializes commits and each one costs an fsync (synchronous=FULL, ~5 ms here): one
        commit per push would cap the server near 200 pushes/s. One writer thread commits whatever
        has queued up in one transaction, and every caller waits until ITS row is committed, so the
        "acknowledged = on disk" promise is unchanged.
        """
        future: Future[int] = Future()
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._writer_loop, name="edgecl-sqlite-writer", daemon=True)
                self._writer.start()
            self._pending.put((sql, args, future))
        return future.result()

    def _writer_loop(self) -> None:
        conn = self._connect()
        while True:
            batch = [self._pending.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                conn.execute("BEGIN IMMEDIATE")
                counts = [conn.execute(sql, args).rowcount for sql, args, _ in batch]
                conn.execute("COMMIT")
            except Exception:  # one bad statement must not fail the others: retry them one by one
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                for sql, args, future in batch:
                    try:
                        future.set_result(conn.execute(sql, args).rowcount)
                    except Exception as exc:
                        future.set_exception(exc)
                continue
            for (_, _, future), count in zip(batch, counts, strict=True):
                future.set_result(count)

    def has_delta(self, sha256: str) -> bool:
        with self._cursor() as cur:
            cur.execute("SELECT 1 FROM deltas WHERE sha256 = ?", (sha256,))
            return cur.fetchone() is not None

    def delta_row(self, sha256: str) -> dict[str, Any] | None:
        rows = self._select_deltas(" WHERE sha256 = ?", (sha256,))
        return rows[0] if rows else None

    def list_deltas(self, bundle_id: str | None = None, version: int | None = None,
                    device: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("bundle_id", bundle_id), ("version", version), ("device", device)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._select_deltas((" WHERE " + " AND ".join(where)) if where else "", tuple(args))

    def _select_deltas(self, where: str, args: tuple) -> list[dict[str, Any]]:
        names = ("sha256", "bundle_id", "version", "device", "size_bytes", "steps", "samples_seen",
                 "values_dtype", "created_utc", "received_ns")
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(names)} FROM deltas{where} ORDER BY received_ns, sha256", args)
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def count_deltas(self) -> int:
        with self._cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM deltas")
            return int(cur.fetchone()[0])

    # -- merges ----------------------------------------------------------------------------------------
    def record_merge(self, sha256: str, bundle_id: str, version: int, overlap_sha256: str, inputs: int,
                     strategy: str) -> None:
        with self._cursor() as cur:
            cur.execute("INSERT INTO merges (sha256, bundle_id, version, overlap_sha256, inputs, strategy, created_ns) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                        (sha256, bundle_id, version, overlap_sha256, inputs, strategy, time.time_ns()))

    def list_merges(self, bundle_id: str, version: int) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute("SELECT sha256, overlap_sha256, inputs, strategy FROM merges WHERE bundle_id = ? "
                        "AND version = ? ORDER BY created_ns", (bundle_id, version))
            return [dict(zip(("sha256", "overlap_sha256", "inputs", "strategy"), r, strict=True)) for r in cur.fetchall()]


class _Cursor:
    """Writes SQL once with ``?`` placeholders; psycopg wants ``%s``."""

    def __init__(self, cur: Any, dialect: str) -> None:
        self._cur = cur
        self._pg = dialect == "postgresql"

    def execute(self, sql: str, args: tuple = ()) -> None:
        self._cur.execute(sql.replace("?", "%s") if self._pg else sql, args)

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


def bundle_from_files(manifest_bytes: bytes, mask_bytes: bytes) -> Bundle:
    """Check a bundle's manifest.json + mask.safetensors agree, and describe it for the server."""
    from edgecl.formats.manifest import BundleManifest
    from edgecl.formats.mask import Mask

    try:
        manifest = BundleManifest.from_json(json.loads(manifest_bytes))
    except (ValueError, TypeError) as exc:
        raise StoreError(f"manifest.json is not a bundle manifest ({exc})", "pass the manifest of an exported bundle") from exc
    mask = Mask.from_bytes(mask_bytes)
    mask_sha = hashlib.sha256(mask_bytes).hexdigest()
    if not NAME_RE.fullmatch(str(manifest.bundle_id)):
        raise StoreError(f"bundle id {manifest.bundle_id!r} is not a valid name",
                         "use letters, digits, '.', '_', '-' (at most 64)")
    if mask_sha != manifest.mask_sha256:
        raise StoreError("mask.safetensors does not match the manifest's mask_sha256",
                         "upload the mask from the same bundle folder")
    if mask.total_selected != int(manifest.selected):
        raise StoreError(f"the mask selects {mask.total_selected} elements, the manifest says {manifest.selected}",
                         "re-export the bundle")
    if not SHA_RE.fullmatch(str(manifest.base_sha256)) or int(manifest.version) < 1:
        raise StoreError("the manifest's base_sha256 or version is invalid", "re-export the bundle")
    return Bundle(bundle_id=manifest.bundle_id, version=int(manifest.version), base_sha256=manifest.base_sha256,
                  mask_sha256=mask_sha, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                  delta_k=mask.total_selected, embedding_dim=int(manifest.embedding_dim), created_utc=_utc())


def add_bundle_dir(store: Store, bundle_dir: str | Path) -> tuple[Bundle, bool]:
    """``edgecl serve add-bundle BUNDLE_DIR``: register the bundle's manifest + mask."""
    from edgecl.formats.manifest import MANIFEST, MASK

    folder = Path(bundle_dir)
    try:
        manifest_bytes, mask_bytes = (folder / MANIFEST).read_bytes(), (folder / MASK).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {exc.filename} ({exc.strerror})",
                         "pass a bundle folder written by `edgecl export`") from exc
    bundle = bundle_from_files(manifest_bytes, mask_bytes)
    return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes)
