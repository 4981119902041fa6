"""Server storage: a SQL database (SQLite or PostgreSQL) for rows + a folder for bytes.

- Bytes (deltas, masks, manifests, overlap files, bundle files) live behind one interface
  (``edgecl/server/blobs.py``), named by their sha256: the same bytes are stored once, a name can
  never be a path chosen by a client, and bytes are checked against their name before they are
  served. ``--blobs folder`` (default): ``STORE/blobs/ab/<sha256>``; ``--blobs database``
  (PostgreSQL): in the database, chunked, so API processes on several machines share nothing but
  the database. A blob is stored durably BEFORE its row is committed, so a row never points at
  missing bytes; a crash in between leaves only an orphan blob that the retried push reuses.
- Rows are committed (SQLite: WAL + synchronous=FULL; PostgreSQL: autocommit) before the API
  answers 2xx, so an acknowledged delta survives kill -9 and power loss.
- Device tokens are stored as sha256 (tokens are 256-bit random, so a plain hash is enough: no
  dictionary to guess from); HMAC keys must be readable to verify signatures, so the database
  itself is a secret (file mode 0600 for SQLite).

- Whole bundle versions (the downlink) are blobs too: ``bundle_files`` maps (bundle, version,
  file name) to a sha256; a release row holds the server's Ed25519 signature of the manifest. The
  signing key comes from configuration (``--release-key-file`` / ``EDGECL_RELEASE_KEY_FILE``, or
  the hex seed in ``EDGECL_RELEASE_KEY``), else ``STORE/release.key`` (mode 0600), made when a
  folder-backed store is created.

For several API processes on several machines use PostgreSQL, ``--blobs database`` and one release
key file every process reads: each keeps only a cache in its own ``--store`` folder.
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
from typing import TYPE_CHECKING, Any

from edgecl.errors import EdgeclError
from edgecl.formats.delta import MERGE_DEVICE_ID, NAME_RE
from edgecl.server.blobs import (
    BLOB_BACKENDS,
    BLOB_SCHEMA_POSTGRESQL,
    BLOB_STORAGE_POSTGRESQL,
    BlobError,
    BlobStore,
    DatabaseBlobs,
    FolderBlobs,
)

if TYPE_CHECKING:
    from edgecl.server.drift import DriftPoint

SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_DB_INT = 2**31 - 1          # versions are SQL INTEGER (32-bit in PostgreSQL)
RELEASE_KEY = "release.key"      # the server's Ed25519 private key (hex), mode 0600 (folder default)
RELEASE_KEY_ENV = "EDGECL_RELEASE_KEY"             # the key's 64 hex digits (a secret manager's variable)
RELEASE_KEY_FILE_ENV = "EDGECL_RELEASE_KEY_FILE"   # a file holding them (a mounted secret)
BLOBS_ENV = "EDGECL_SERVER_BLOBS"                  # folder | database
_CHUNK_BYTES = 1 << 20
BUNDLE_CACHE_S = 5.0             # how long a bundle row registered without its files is cached

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
CREATE TABLE IF NOT EXISTS bundle_files (
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (bundle_id, version, name)
);
CREATE TABLE IF NOT EXISTS merge_jobs (
    job_id TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    done BIGINT NOT NULL,
    total BIGINT NOT NULL,
    result TEXT NOT NULL,
    error TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    signature TEXT NOT NULL,
    canary TEXT NOT NULL,
    report TEXT NOT NULL,
    released_ns BIGINT NOT NULL,
    PRIMARY KEY (bundle_id, version)
);
CREATE TABLE IF NOT EXISTS drift_reports (
    device TEXT NOT NULL,
    received_ns BIGINT NOT NULL,
    bundle_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    window_images BIGINT NOT NULL,
    images_total BIGINT NOT NULL,
    unknown_rate DOUBLE PRECISION,
    mean_confidence DOUBLE PRECISION,
    embedding_shift DOUBLE PRECISION,
    PRIMARY KEY (device, received_ns)
);
"""

# Columns added after the first release: created on an old store when it is opened.
_ADDED_COLUMNS = {
    "devices": {"revoked": "INTEGER NOT NULL DEFAULT 0", "last_seen_ns": "BIGINT NOT NULL DEFAULT 0",
                "last_bundle": "TEXT NOT NULL DEFAULT ''", "last_version": "INTEGER NOT NULL DEFAULT 0",
                "last_event": "TEXT NOT NULL DEFAULT ''", "last_heldout": "TEXT NOT NULL DEFAULT ''"},
    "bundles": {"scales_sha256": "TEXT NOT NULL DEFAULT ''"},
    "deltas": {"heldout": "TEXT NOT NULL DEFAULT ''"},
    "merges": {"devices": "TEXT NOT NULL DEFAULT ''", "options": "TEXT NOT NULL DEFAULT ''"},
}
_DEVICE_COLUMNS = ("name", "role", "created_utc", "revoked", "last_seen_ns", "last_bundle", "last_version",
                   "last_event", "last_heldout")
_DELTA_COLUMNS = ("sha256", "bundle_id", "version", "device", "size_bytes", "steps", "samples_seen",
                  "values_dtype", "created_utc", "received_ns", "heldout")


class StoreError(EdgeclError):
    """The database or the blob folder cannot be used as asked."""


def _release_key_source(root: Path, key_file: str | Path | None, shared: bool) -> tuple[str, str]:
    """Where the release signing key is: ("env", "") or ("file", path). Every replica of a server
    must sign with one key, so shared blob storage (several machines) refuses the per-folder default."""
    if os.environ.get(RELEASE_KEY_ENV):
        return "env", ""
    chosen = key_file or os.environ.get(RELEASE_KEY_FILE_ENV)
    if chosen:
        return "file", str(Path(chosen).expanduser())
    if shared:
        raise StoreError("--blobs database needs a release key every replica reads",
                         f"pass --release-key-file PATH (or set {RELEASE_KEY_FILE_ENV} / {RELEASE_KEY_ENV}); "
                         "make one with `edgecl server key --new PATH`")
    return "file", str(root / RELEASE_KEY)


@dataclass
class Device:
    name: str
    role: str            # "device" (may push) or "admin" (may also add bundles and merge)
    hmac_key: bytes
    revoked: bool = False


@dataclass
class BundleRow:
    bundle_id: str
    version: int
    base_sha256: str
    mask_sha256: str
    manifest_sha256: str
    delta_k: int
    embedding_dim: int
    created_utc: str
    scales_sha256: str = ""      # per-tensor max |W0| table (JSON blob); "" = registered without weights

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """One store = one database + one blob folder. Thread-safe: one DB connection per thread."""

    def __init__(self, store_dir: str | Path, db_url: str | None = None, blobs: str | None = None,
                 release_key_file: str | Path | None = None) -> None:
        """``blobs``: "folder" or "database" (default: env EDGECL_SERVER_BLOBS, else folder);
        ``release_key_file``: where the release signing key is (default: env EDGECL_RELEASE_KEY,
        then EDGECL_RELEASE_KEY_FILE, then STORE/release.key)."""
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
        kind = blobs or os.environ.get(BLOBS_ENV) or "folder"
        if kind not in BLOB_BACKENDS:
            raise StoreError(f"unknown blob storage {kind!r}", f"use one of {', '.join(BLOB_BACKENDS)}")
        if kind == "database" and self.dialect != "postgresql":
            raise StoreError("--blobs database needs PostgreSQL", "pass --db postgresql://... (or --blobs folder)")
        self._key_source = _release_key_source(self.root, release_key_file, shared=kind == "database")
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._pending: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._limits: dict[tuple[str, int, str], Any] = {}  # per-process cache of value bounds per bundle
        self._bundles: dict[tuple[str, int], tuple[BundleRow, float | None]] = {}  # row, expiry (None: final)
        with self._cursor() as cur:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                cur.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():
                cur.execute(f"SELECT * FROM {table} LIMIT 0")
                have = {d[0] for d in cur.description}
                for column, ddl in columns.items():
                    if column not in have:
                        cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
            if kind == "database":
                for statement in filter(str.strip, BLOB_SCHEMA_POSTGRESQL.split(";")):
                    cur.execute(statement)
                storage, make_external = BLOB_STORAGE_POSTGRESQL
                cur.execute(storage)
                if cur.fetchone()[0] != "e":
                    cur.execute(make_external)
        folder = FolderBlobs(self.root)
        self.blobs: BlobStore = DatabaseBlobs(self._cursor, folder) if kind == "database" else folder
        self._folder = folder
        if self.dialect == "sqlite":
            with contextlib.suppress(OSError):
                os.chmod(self._sqlite_path, 0o600)     # it holds the devices' HMAC keys
        self._ensure_release_key()

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
    def _cursor(self, transaction: bool = False) -> Iterator[Any]:
        """A cursor on this thread's connection; ``transaction``: its statements commit together
        (PostgreSQL: one WAL flush instead of one per statement)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._all.append(conn)
        scope = conn.transaction() if transaction and self.dialect == "postgresql" else contextlib.nullcontext()
        with scope:
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

    # -- blobs (edgecl/server/blobs.py) -----------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where this process keeps a blob's local copy (the blob itself with ``--blobs folder``)."""
        try:
            return self._folder.path(sha256)
        except BlobError as exc:
            raise StoreError(exc.problem, exc.fix) from exc

    def blob_file(self, sha256: str) -> Path | None:
        """A local file with the blob's bytes, checked against its name now; None if missing or damaged."""
        return self.blobs.local_file(sha256)

    def blob_size(self, sha256: str) -> int | None:
        return self.blobs.size(sha256)

    def put_blob(self, data: bytes, sha256: str | None = None) -> str:
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        self.blob_path(sha256)          # a sha256, or a StoreError
        self.blobs.put(data, sha256)
        return sha256

    def blob_ok(self, sha256: str) -> bool:
        """The blob exists AND its bytes hash to its name: a file of the right size left by a
        crash, a bad disk or a hand edit is never trusted unread."""
        self.blob_path(sha256)
        return self.blobs.has(sha256)

    def put_blob_file(self, source: str | Path) -> tuple[str, int]:
        """Copy a file into the blob store (streamed, hashed on the way); (sha256, size)."""
        digest = hashlib.sha256()
        tmp = self.blob_tmp_path()
        size = 0
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            return self.adopt_blob(tmp, digest.hexdigest()), size
        finally:
            tmp.unlink(missing_ok=True)

    def blob_tmp_path(self) -> Path:
        """A fresh temp file path inside the store (same file system as the blobs: rename is atomic)."""
        return self._folder.tmp_path()

    def adopt_blob(self, tmp: Path, sha256: str) -> str:
        """Store a complete, fsynced temp file whose sha256 the caller computed."""
        self.blob_path(sha256)
        self.blobs.adopt(tmp, sha256)
        return sha256

    def get_blob(self, sha256: str) -> bytes | None:
        """The blob's bytes, checked against its name; None when missing or damaged."""
        return self.blobs.get(sha256)

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
            cur.execute("SELECT name, role, hmac_key, revoked FROM devices WHERE token_sha256 = ?",
                        (token_sha256(token),))
            row = cur.fetchone()
        return Device(row[0], row[1], bytes.fromhex(row[2]), bool(row[3])) if row else None

    def device_for_push(self, token: str) -> tuple[Device | None, dict[tuple[str, int], list[str]]]:
        """The token's device, and the devices of every release made for a canary only ((bundle,
        version) -> names), in ONE query: a push needs both (service.check_header), and a database
        round trip costs more than the few rows of canary releases."""
        with self._cursor() as cur:
            cur.execute("SELECT 'device', name, role, hmac_key, revoked, 0, '' FROM devices WHERE token_sha256 = ? "
                        "UNION ALL SELECT 'canary', bundle_id, '', '', 0, version, canary FROM releases "
                        "WHERE canary != '[]'", (token_sha256(token),))
            rows = cur.fetchall()
        device = next((Device(r[1], r[2], bytes.fromhex(r[3]), bool(r[4])) for r in rows if r[0] == "device"), None)
        return device, {(r[1], int(r[5])): json.loads(r[6]) for r in rows if r[0] == "canary"}

    def _known_device(self, name: str) -> None:
        with self._cursor() as cur:
            cur.execute("SELECT role FROM devices WHERE name = ?", (name,))
            row = cur.fetchone()
        if row is None or row[0] == "merge":
            raise StoreError(f"no device named {name!r}", "list them with `edgecl server device list`")

    def revoke_device(self, name: str) -> None:
        """Refuse the device's token from now on (its stored deltas stay, and still count unless excluded)."""
        self._known_device(name)
        with self._cursor() as cur:
            cur.execute("UPDATE devices SET revoked = 1 WHERE name = ?", (name,))

    def rotate_device(self, name: str) -> tuple[str, str]:
        """New token and key for a device (the old ones stop working at once); also lifts a revocation."""
        self._known_device(name)
        token, key = "ecl_" + secrets.token_urlsafe(32), secrets.token_hex(32)
        with self._cursor() as cur:
            cur.execute("UPDATE devices SET token_sha256 = ?, hmac_key = ?, revoked = 0 WHERE name = ?",
                        (token_sha256(token), key, name))
        return token, key

    def list_devices(self) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices WHERE role != 'merge' ORDER BY name")
            rows = [dict(zip(_DEVICE_COLUMNS, r, strict=True)) for r in cur.fetchall()]
        for row in rows:
            row["revoked"] = bool(row["revoked"])
            row["last_seen_utc"] = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["last_seen_ns"] / 1e9))
                                    if row["last_seen_ns"] else "")
            row["last_heldout"] = json.loads(row["last_heldout"]) if row["last_heldout"] else None
        return rows

    def _touch_sql(self, name: str, event: str, bundle_id: str = "", version: int = 0,
                   heldout: str = "") -> tuple[str, tuple]:
        # A heartbeat keeps the last report it had when this one carries none.
        return ("UPDATE devices SET last_seen_ns = ?, last_event = ?, last_bundle = CASE WHEN ? = '' THEN "
                "last_bundle ELSE ? END, last_version = CASE WHEN ? = 0 THEN last_version ELSE ? END, "
                "last_heldout = CASE WHEN ? = '' THEN last_heldout ELSE ? END WHERE name = ?",
                (time.time_ns(), event, bundle_id, bundle_id, version, version, heldout, heldout, name))

    def touch_device(self, name: str, event: str, bundle_id: str = "", version: int = 0, heldout: str = "") -> None:
        """Heartbeat: the device was seen now (push, pull, upgrade), at this bundle version."""
        sql, args = self._touch_sql(name, event, bundle_id, version, heldout)
        if self.dialect == "sqlite":
            self._group_commit([(sql, args)])
            return
        with self._cursor() as cur:
            cur.execute(sql, args)

    # -- drift reports (edgecl/server/drift.py) ----------------------------------------------------------
    _DRIFT_COLUMNS = ("received_ns", "bundle_id", "version", "state", "window_images", "images_total",
                      "unknown_rate", "mean_confidence", "embedding_shift")

    def add_drift_report(self, name: str, event: str, bundle_id: str, version: int, point: DriftPoint,
                         keep: int) -> None:
        """A heartbeat that carries ``edgecl watch``'s drift statistics: the device is seen, the point is
        added to its series, and points beyond its newest ``keep`` are dropped, in one commit (a device
        that sends too often loses history, never fills the database)."""
        now = time.time_ns()
        touch = self._touch_sql(name, event, bundle_id, version)
        insert = (f"INSERT INTO drift_reports (device, {', '.join(self._DRIFT_COLUMNS)}) VALUES "
                  "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, received_ns) DO NOTHING",
                  (name, now, bundle_id, version, point.state, point.window_images, point.images_total,
                   point.unknown_rate, point.mean_confidence, point.embedding_shift))
        # The (keep)-th newest point's time, when there is one: everything older goes (NULL: nothing does).
        prune = ("DELETE FROM drift_reports WHERE device = ? AND received_ns < (SELECT received_ns FROM "
                 "drift_reports WHERE device = ? ORDER BY received_ns DESC LIMIT 1 OFFSET ?)",
                 (name, name, max(int(keep), 1) - 1))
        if self.dialect == "sqlite":
            self._group_commit([touch, insert, prune])
            return
        with self._cursor(transaction=True) as cur:
            for sql, args in (touch, insert, prune):
                cur.execute(sql, args)

    def drift_series(self, device: str | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """Per device (by name) its drift points, oldest first, as columns: {"device", "points": N,
        "received_ns": [...], "received_utc": [...], "bundle_id": [...], ...}; ``last``: only the newest N."""
        where, args = ("WHERE device = ? ", (device,)) if device is not None else ("", ())
        columns = ", ".join(self._DRIFT_COLUMNS)
        rank = ""
        if last is not None:    # window functions: SQLite >= 3.25 and every PostgreSQL the server supports
            rank = "WHERE newest <= ?"
            args = (*args, int(last))
        with self._cursor() as cur:
            cur.execute(f"SELECT device, {columns} FROM (SELECT device, {columns}, ROW_NUMBER() OVER (PARTITION BY "
                        f"device ORDER BY received_ns DESC) AS newest FROM drift_reports {where}) AS ranked {rank} "
                        "ORDER BY device, received_ns", args)
            rows = cur.fetchall()
        series: dict[str, dict[str, Any]] = {}
        for row in rows:
            one = series.setdefault(row[0], {"device": row[0], "points": 0, "received_utc": [],
                                             **{c: [] for c in self._DRIFT_COLUMNS}})
            one["points"] += 1
            for column, value in zip(self._DRIFT_COLUMNS, row[1:], strict=True):
                one[column].append(value)
            one["received_utc"].append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row[1] / 1e9)))
        return list(series.values())

    def merge_key(self) -> bytes:
        """The server's own signing key for merged deltas (device id "merge"), made on first use."""
        with self._cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_sha256, hmac_key, role, created_utc) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (name) DO NOTHING",
                        (MERGE_DEVICE_ID, token_sha256(secrets.token_hex(32)), secrets.token_hex(32), "merge", _utc()))
            cur.execute("SELECT hmac_key FROM devices WHERE name = ?", (MERGE_DEVICE_ID,))
            return bytes.fromhex(cur.fetchone()[0])

    # -- the release signing key ----------------------------------------------------------------------
    def _ensure_release_key(self) -> None:
        """STORE/release.key is made once per folder-backed store when no key is configured; a link
        from a complete temp file, so two processes opening a new store at once agree on one key
        and nobody ever reads half of one. A configured key (file or environment) is never made here."""
        if self._key_source != ("file", str(self.root / RELEASE_KEY)):
            return
        path = self.root / RELEASE_KEY
        if path.exists():
            return
        from edgecl.formats.signing import SignatureError, generate_private_key, write_secret

        try:
            seed = generate_private_key()
        except SignatureError as exc:   # pushes and merges work without it; releases say what to install
            import warnings

            warnings.warn(f"no release key made: {exc}", stacklevel=3)
            return
        tmp = self.root / f".{RELEASE_KEY}.{os.getpid()}.{secrets.token_hex(4)}"
        write_secret(tmp, seed.hex().encode() + b"\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def release_private_key(self) -> bytes:
        kind, where = self._key_source
        try:
            text = os.environ.get(RELEASE_KEY_ENV, "") if kind == "env" else Path(where).read_text()
            seed = bytes.fromhex(text.strip())
            if len(seed) != 32:
                raise ValueError("not 32 bytes")
            return seed
        except (OSError, ValueError) as exc:
            place = f"${RELEASE_KEY_ENV}" if kind == "env" else where
            raise StoreError(f"the release key {place} is missing or damaged",
                             "restore it from backup (devices pinned its public key): docs/server.md#release-key"
                             ) from exc

    def release_public_key(self) -> str:
        from edgecl.formats.signing import public_key

        return public_key(self.release_private_key()).hex()

    # -- bundles ---------------------------------------------------------------------------------------
    def add_bundle(self, bundle: BundleRow, manifest_bytes: bytes, mask_bytes: bytes,
                   files: dict[str, tuple[str, int]] | None = None) -> bool:
        """Register a bundle version; False if it was already there with the same hashes.

        ``files`` (name -> (sha256, size), blobs already stored) makes it a whole bundle the
        server can serve; a version first registered without files gets them added later."""
        self.put_blob(manifest_bytes, bundle.manifest_sha256)
        self.put_blob(mask_bytes, bundle.mask_sha256)
        with self._cursor() as cur:
            cur.execute("INSERT INTO bundles (bundle_id, version, base_sha256, mask_sha256, manifest_sha256, delta_k, "
                        "embedding_dim, created_utc, scales_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (bundle_id, version) DO NOTHING",
                        (bundle.bundle_id, bundle.version, bundle.base_sha256, bundle.mask_sha256,
                         bundle.manifest_sha256, bundle.delta_k, bundle.embedding_dim, bundle.created_utc,
                         bundle.scales_sha256))
            new = cur.rowcount == 1
        if not new:
            known = self.get_bundle(bundle.bundle_id, bundle.version)
            assert known is not None
            if (known.base_sha256, known.mask_sha256) != (bundle.base_sha256, bundle.mask_sha256):
                raise StoreError(f"bundle {bundle.bundle_id} v{bundle.version} is already registered with other "
                                 "weights or mask", "export the changed bundle as a new version")
            if files and known.manifest_sha256 != bundle.manifest_sha256 and self.bundle_files(
                    bundle.bundle_id, bundle.version):
                raise StoreError(f"bundle {bundle.bundle_id} v{bundle.version} is already stored with another "
                                 "manifest.json", "export the changed bundle as a new version")
        if files:
            with self._cursor() as cur:
                for name, (sha256, size) in sorted(files.items()):
                    cur.execute("INSERT INTO bundle_files (bundle_id, version, name, sha256, size_bytes) "
                                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (bundle_id, version, name) DO NOTHING",
                                (bundle.bundle_id, bundle.version, name, sha256, size))
                # A version registered earlier from its manifest + mask only gains its files and scales.
                cur.execute("UPDATE bundles SET manifest_sha256 = ?, scales_sha256 = ? WHERE bundle_id = ? AND "
                            "version = ? AND scales_sha256 = ''", (bundle.manifest_sha256, bundle.scales_sha256,
                                                                   bundle.bundle_id, bundle.version))
        self._bundles.pop((bundle.bundle_id, bundle.version), None)
        return new

    _BUNDLE_COLUMNS = ("bundle_id, version, base_sha256, mask_sha256, manifest_sha256, delta_k, embedding_dim, "
                       "created_utc, scales_sha256")

    def get_bundle(self, bundle_id: str, version: int) -> BundleRow | None:
        """A registered bundle version. Every push looks its bundle up, so rows are cached in this
        process: for good once the bundle's files are stored (the row never changes again), for
        BUNDLE_CACHE_S while it is registered from its manifest and mask only (storing its files
        later adds its weight scales)."""
        if not 1 <= version <= MAX_DB_INT:
            return None
        cached = self.cached_bundle(bundle_id, version)
        if cached is not None:
            return cached
        with self._cursor() as cur:
            cur.execute(f"SELECT {self._BUNDLE_COLUMNS} FROM bundles WHERE bundle_id = ? AND version = ?",
                        (bundle_id, version))
            row = cur.fetchone()
        bundle = BundleRow(*row) if row else None
        if bundle is not None:
            self._bundles[(bundle_id, version)] = (bundle, None if bundle.scales_sha256
                                                   else time.monotonic() + BUNDLE_CACHE_S)
        return bundle

    def cached_bundle(self, bundle_id: str, version: int) -> BundleRow | None:
        """get_bundle's answer when this process has it cached (no database); else None."""
        cached = self._bundles.get((bundle_id, version))
        if cached is not None and (cached[1] is None or cached[1] > time.monotonic()):
            return cached[0]
        return None

    def list_bundles(self) -> list[BundleRow]:
        with self._cursor() as cur:
            cur.execute(f"SELECT {self._BUNDLE_COLUMNS} FROM bundles ORDER BY bundle_id, version")
            return [BundleRow(*row) for row in cur.fetchall()]

    def bundle_files(self, bundle_id: str, version: int) -> dict[str, dict[str, Any]]:
        """name -> {sha256, size_bytes} of a whole stored bundle version ({} when only registered)."""
        with self._cursor() as cur:
            cur.execute("SELECT name, sha256, size_bytes FROM bundle_files WHERE bundle_id = ? AND version = ? "
                        "ORDER BY name", (bundle_id, version))
            return {r[0]: {"sha256": r[1], "size_bytes": int(r[2])} for r in cur.fetchall()}

    def value_limits(self, bundle: BundleRow) -> Any:
        """Cached per process: (per-element bound [K] on |delta|, bound on |prototype|) (service.py)."""
        key = (bundle.bundle_id, bundle.version, bundle.scales_sha256)   # new scales: new bounds
        if key not in self._limits:
            from edgecl.server.bounds import limits_for

            scales = None
            if bundle.scales_sha256:
                raw = self.get_blob(bundle.scales_sha256)
                scales = json.loads(raw) if raw else None
            mask_bytes = self.get_blob(bundle.mask_sha256)
            if mask_bytes is None:
                raise StoreError(f"the mask of bundle {bundle.bundle_id} v{bundle.version} is missing or damaged",
                                 "register the bundle again (`edgecl server bundle add`)")
            self._limits[key] = limits_for(mask_bytes, scales)
        return self._limits[key]

    # -- releases --------------------------------------------------------------------------------------
    def add_release(self, bundle_id: str, version: int, manifest_sha256: str, signature: str,
                    canary: list[str], report: dict[str, Any]) -> bool:
        with self._cursor() as cur:
            cur.execute("INSERT INTO releases (bundle_id, version, manifest_sha256, signature, canary, report, "
                        "released_ns) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle_id, version) DO NOTHING",
                        (bundle_id, version, manifest_sha256, signature, json.dumps(sorted(canary)),
                         json.dumps(report, sort_keys=True), time.time_ns()))
            return cur.rowcount == 1

    def release_canary(self, bundle_id: str, version: int) -> list[str] | None:
        """The canary devices of a released version ([] = every device); None when not released."""
        with self._cursor() as cur:
            cur.execute("SELECT canary FROM releases WHERE bundle_id = ? AND version = ?", (bundle_id, version))
            row = cur.fetchone()
        return json.loads(row[0]) if row else None

    def promote_release(self, bundle_id: str, version: int) -> None:
        """A canary release becomes a release for every device."""
        with self._cursor() as cur:
            cur.execute("UPDATE releases SET canary = '[]' WHERE bundle_id = ? AND version = ?", (bundle_id, version))
            if cur.rowcount != 1:
                raise StoreError(f"bundle {bundle_id} v{version} is not released", "release it first (`edgecl release`)")

    def list_releases(self, bundle_id: str | None = None) -> list[dict[str, Any]]:
        names = ("bundle_id", "version", "manifest_sha256", "signature", "canary", "report", "released_ns")
        where, args = ("WHERE bundle_id = ? ", (bundle_id,)) if bundle_id is not None else ("", ())
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(names)} FROM releases {where}ORDER BY bundle_id, version", args)
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        for row in rows:
            row["canary"] = json.loads(row["canary"])
            row["report"] = json.loads(row["report"])
            row["released_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["released_ns"] / 1e9))
        return rows

    # -- deltas ----------------------------------------------------------------------------------------
    def put_delta(self, data: bytes, sha256: str, row: dict[str, Any]) -> bool:
        """Store an accepted delta durably; False when these exact bytes were already stored. The
        push is also the device's heartbeat, committed with the row."""
        in_database = isinstance(self.blobs, DatabaseBlobs)
        if not in_database:
            self.put_blob(data, sha256)         # durable before its row: a row never names missing bytes
        sql = ("INSERT INTO deltas (sha256, bundle_id, version, device, size_bytes, steps, samples_seen, "
               "values_dtype, created_utc, received_ns, heldout) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (sha256) DO NOTHING")
        heldout = row.get("heldout") or ""
        args = (sha256, row["bundle_id"], row["version"], row["device"], len(data), row["steps"],
                row["samples_seen"], row["values_dtype"], row["created_utc"], time.time_ns(), heldout)
        touch = (self._touch_sql(row["device"], "push", row["bundle_id"], row["version"], heldout)
                 if row["device"] != MERGE_DEVICE_ID else None)
        if self.dialect == "sqlite":
            return self._group_commit([(sql, args)] + ([touch] if touch else [])) == 1
        # PostgreSQL: everything in ONE statement (data-modifying CTEs, each run exactly once):
        # with --blobs database the bytes' chunks and blob row, then the delta row and the
        # heartbeat. One round trip and one commit (one WAL flush) per push; autocommit makes the
        # statement its own transaction, so the bytes and their row commit together or not at all.
        ctes, params = DatabaseBlobs.insert_ctes(sha256, data) if in_database else ([], [])
        ctes.append(f"delta_in AS ({sql} RETURNING 1)")
        params.extend(args)
        if touch is not None:
            ctes.append(f"heartbeat AS ({touch[0]})")
            params.extend(touch[1])
        # (no local copy written with --blobs database: a replica caches a blob when it first serves it)
        with self._cursor() as cur:
            cur.execute(f"WITH {', '.join(ctes)} SELECT COUNT(*) FROM delta_in", tuple(params))
            return int(cur.fetchone()[0]) == 1

    def _group_commit(self, statements: list[tuple[str, tuple]]) -> int:
        """Run a caller's statements (an INSERT and its heartbeat) inside one transaction shared with
        the other callers waiting right now; returns the first statement's rowcount.

        SQLite serializes commits and each one costs an fsync (synchronous=FULL, ~5 ms here): one
        commit per push would cap the server near 200 pushes/s. One writer thread commits whatever
        has queued up in one transaction, and every caller waits until ITS rows are committed, so the
        "acknowledged = on disk" promise is unchanged.
        """
        future: Future[int] = Future()
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._writer_loop, name="edgecl-sqlite-writer", daemon=True)
                self._writer.start()
            self._pending.put((statements, future))
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
                counts = [[conn.execute(sql, args).rowcount for sql, args in statements][0]
                          for statements, _ in batch]
                conn.execute("COMMIT")
            except Exception:  # one bad statement must not fail the others: retry them one caller at a time
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                for statements, future in batch:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        count = [conn.execute(sql, args).rowcount for sql, args in statements][0]
                        conn.execute("COMMIT")
                        future.set_result(count)
                    except Exception as exc:
                        with contextlib.suppress(Exception):
                            conn.execute("ROLLBACK")
                        future.set_exception(exc)
                continue
            for (_, future), count in zip(batch, counts, strict=True):
                future.set_result(count)

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
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(_DELTA_COLUMNS)} FROM deltas{where} ORDER BY received_ns, sha256", args)
            rows = [dict(zip(_DELTA_COLUMNS, row, strict=True)) for row in cur.fetchall()]
        for row in rows:
            row["heldout"] = json.loads(row["heldout"]) if row["heldout"] else None
        return rows

    def count_deltas(self) -> int:
        with self._cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM deltas")
            return int(cur.fetchone()[0])

    # -- merges ----------------------------------------------------------------------------------------
    def record_merge(self, sha256: str, bundle_id: str, version: int, overlap_sha256: str, inputs: int,
                     strategy: str, devices: list[str] | None = None, options: dict[str, Any] | None = None) -> None:
        with self._cursor() as cur:
            cur.execute("INSERT INTO merges (sha256, bundle_id, version, overlap_sha256, inputs, strategy, created_ns, "
                        "devices, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                        (sha256, bundle_id, version, overlap_sha256, inputs, strategy, time.time_ns(),
                         json.dumps(devices or []), json.dumps(options or {}, sort_keys=True)))

    def list_merges(self, bundle_id: str | None = None, version: int | None = None) -> list[dict[str, Any]]:
        names = ("sha256", "bundle_id", "version", "overlap_sha256", "inputs", "strategy", "created_ns", "devices",
                 "options")
        where, args = [], []
        for column, value in (("bundle_id", bundle_id), ("version", version)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(names)} FROM merges{' WHERE ' + ' AND '.join(where) if where else ''} "
                        "ORDER BY created_ns", tuple(args))
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        for row in rows:
            row["devices"] = json.loads(row["devices"]) if row["devices"] else []
            row["options"] = json.loads(row["options"]) if row["options"] else {}
        return rows

    # -- merge jobs (jobs.py) --------------------------------------------------------------------------
    _JOB_COLUMNS = ("job_id", "bundle_id", "version", "strategy", "state", "phase", "done", "total", "result",
                    "error", "created_ns", "updated_ns")

    def add_merge_job(self, job_id: str, bundle_id: str, version: int, strategy: str, total: int) -> None:
        now = time.time_ns()
        with self._cursor() as cur:
            cur.execute(f"INSERT INTO merge_jobs ({', '.join(self._JOB_COLUMNS)}) VALUES "
                        "(?, ?, ?, ?, 'queued', 'queued', 0, ?, '', '', ?, ?)",
                        (job_id, bundle_id, version, strategy, total, now, now))

    def update_merge_job(self, job_id: str, state: str, phase: str, done: int, total: int,
                         result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        with self._cursor() as cur:
            cur.execute("UPDATE merge_jobs SET state = ?, phase = ?, done = ?, total = ?, result = ?, error = ?, "
                        "updated_ns = ? WHERE job_id = ?",
                        (state, phase, done, total, json.dumps(result) if result else "",
                         json.dumps(error) if error else "", time.time_ns(), job_id))

    def touch_merge_jobs(self, job_ids: list[str]) -> None:
        """The process running these jobs is alive (jobs.py: a job nobody touches goes stale)."""
        with self._cursor() as cur:
            for job_id in job_ids:
                cur.execute("UPDATE merge_jobs SET updated_ns = ? WHERE job_id = ?", (time.time_ns(), job_id))

    def merge_job(self, job_id: str) -> dict[str, Any] | None:
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(self._JOB_COLUMNS)} FROM merge_jobs WHERE job_id = ?", (job_id,))
            row = cur.fetchone()
        if row is None:
            return None
        job = dict(zip(self._JOB_COLUMNS, row, strict=True))
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["error"] = json.loads(job["error"]) if job["error"] else None
        return job


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

    @property
    def description(self) -> Any:
        return self._cur.description

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


def bundle_from_files(manifest_bytes: bytes, mask_bytes: bytes) -> BundleRow:
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
    return BundleRow(bundle_id=manifest.bundle_id, version=int(manifest.version), base_sha256=manifest.base_sha256,
                  mask_sha256=mask_sha, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                  delta_k=mask.total_selected, embedding_dim=int(manifest.embedding_dim), created_utc=_utc())


def add_bundle_dir(store: Store, bundle_dir: str | Path) -> tuple[BundleRow, bool]:
    """``edgecl server bundle add BUNDLE_DIR``: store the whole bundle version (manifest.json and
    every file its manifest lists, each by sha256, each checked against the manifest) so the server
    can serve it, and register it (with the per-tensor weight scales the push checks use)."""
    from edgecl.formats.manifest import MANIFEST, MASK, stored_files

    folder = Path(bundle_dir)
    try:
        manifest_bytes, mask_bytes = (folder / MANIFEST).read_bytes(), (folder / MASK).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {exc.filename} ({exc.strerror})",
                         "pass a bundle folder written by `edgecl export`") from exc
    bundle = bundle_from_files(manifest_bytes, mask_bytes)
    listed = stored_files(json.loads(manifest_bytes))   # the device's files and the server-only ones
    if not listed:      # a hand-made or pre-0.2 bundle: registered for pushes, not served
        return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes)
    files: dict[str, tuple[str, int]] = {MANIFEST: (bundle.manifest_sha256, len(manifest_bytes))}
    for name, expected in sorted(listed.items()):
        if not NAME_RE.fullmatch(name):
            raise StoreError(f"the manifest lists a file named {name[:80]!r}", "re-export the bundle")
        try:
            sha256, size = store.put_blob_file(folder / name)
        except OSError as exc:
            raise StoreError(f"cannot read {folder / name} ({exc.strerror})",
                             "copy the whole bundle folder (every file its manifest lists)") from exc
        if sha256 != expected:
            raise StoreError(f"{folder / name} does not match the manifest's sha256",
                             "the bundle is damaged or was changed after export: export it again")
        files[name] = (sha256, size)
    bundle.scales_sha256 = store.put_blob(scales_json(store, files, mask_bytes))
    return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes, files)


def scales_json(store: Store, files: dict[str, tuple[str, int]], mask_bytes: bytes) -> bytes:
    """The bundle's value scales (server/bounds.py), read from its stored blobs, as a JSON blob."""
    from edgecl.formats.manifest import PROTOTYPES, WEIGHTS
    from edgecl.server.bounds import scale_table

    def blob(name: str) -> Path | None:
        return store.blob_file(files[name][0]) if name in files else None

    table = scale_table(blob(WEIGHTS), mask_bytes, blob(PROTOTYPES))
    return (json.dumps(table, sort_keys=True, separators=(",", ":")) + "\n").encode()


def add_bundle_blobs(store: Store, files: dict[str, str]) -> tuple[BundleRow, bool]:
    """``POST /v1/bundles {"files": {name: sha256}}``: register a whole bundle whose files were
    uploaded as blobs first (``PUT /v1/blobs/{sha256}``); every file the manifest lists must be there."""
    from edgecl.formats.manifest import MANIFEST, MASK, stored_files

    if MANIFEST not in files or MASK not in files:
        raise StoreError("the file list lacks manifest.json or mask.safetensors", "send every file of the bundle")
    blobs: dict[str, tuple[str, int]] = {}
    for name, sha256 in files.items():
        if not (isinstance(name, str) and NAME_RE.fullmatch(name) and isinstance(sha256, str)
                and SHA_RE.fullmatch(sha256)):
            raise StoreError(f"file entry {str(name)[:80]!r} is not name -> sha256", "send {name: sha256}")
        size = store.blob_size(sha256) if store.blob_ok(sha256) else None
        if size is None:
            raise StoreError(f"{name} ({sha256[:12]}) has not been uploaded", "PUT /v1/blobs/{sha256} first")
        blobs[name] = (sha256, size)
    manifest_bytes = store.get_blob(files[MANIFEST]) or b""
    mask_bytes = store.get_blob(files[MASK]) or b""
    bundle = bundle_from_files(manifest_bytes, mask_bytes)
    listed = stored_files(json.loads(manifest_bytes))   # the device's files and the server-only ones
    if set(listed) | {MANIFEST} != set(files):
        raise StoreError(f"the files sent ({', '.join(sorted(files))}) are not the manifest's "
                         f"({', '.join(sorted(listed))} + manifest.json)", "send exactly the bundle's files")
    for name, expected in listed.items():
        if files[name] != expected:
            raise StoreError(f"{name} does not match the manifest's sha256", "upload the bundle's own files")
    bundle.scales_sha256 = store.put_blob(scales_json(store, blobs, mask_bytes))
    return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes, blobs)
