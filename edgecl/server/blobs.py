"""Where the server keeps bytes (deltas, bundle files, masks, overlap files): one interface, two backends.

Every blob is named by the sha256 of its bytes, and its bytes are checked against that name before
they are served or trusted (a file left by a crash, bit rot, a hand edit: never served as if good).

- ``FolderBlobs`` (``--blobs folder``, the default): ``STORE/blobs/ab/<sha256>``, each written
  atomically (temp file, fsync, rename, folder fsync). One machine, or a folder every API process
  mounts.
- ``DatabaseBlobs`` (``--blobs database``, PostgreSQL): the bytes live in the database itself, in
  1 MiB chunks (``blob_chunks``), written in one transaction with their ``blobs`` row, so a row
  never names half a blob. N API processes on N machines then share nothing but the database;
  each keeps a local, verified copy of what it serves in its own ``STORE/blobs`` (a cache: deleting
  it loses nothing). Chosen over an S3-compatible store because it needs no second service to run,
  back up and secure, and the suite can test it against a real PostgreSQL on loopback; blobs are
  write-once and small next to a database's limits (a Lite0 bundle is ~30 MB per version).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from edgecl.errors import EdgeclError
from edgecl.formats.atomic import fsync_dir

CHUNK_BYTES = 1 << 20           # read/hash granularity, and one database chunk
STALE_TMP_S = 3600.0            # a blob temp file older than this is a killed writer's leftover
BLOB_BACKENDS = ("folder", "database")


class BlobError(EdgeclError):
    """A blob cannot be stored or read as asked."""


def check_sha256(sha256: str) -> str:
    if not (isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise BlobError(f"{str(sha256)[:80]!r} is not a sha256", "use the 64-hex-digit id the server returned")
    return sha256


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # another user's process
        return True
    return True


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class BlobStore(Protocol):
    """What the server needs from a place that keeps bytes by their sha256."""

    kind: str

    def has(self, sha256: str) -> bool:
        """The blob is there AND its bytes hash to its name."""
        ...

    def get(self, sha256: str) -> bytes | None:
        """The blob's bytes, verified; None when it is missing or damaged."""
        ...

    def put(self, data: bytes, sha256: str) -> None:
        """Store ``data`` (the caller computed ``sha256``); durable when this returns."""
        ...

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Store a complete, fsynced temp file whose sha256 the caller computed (it may be moved)."""
        ...

    def local_file(self, sha256: str) -> Path | None:
        """A local file holding the blob's verified bytes (to stream, or to read by path); None if missing."""
        ...

    def size(self, sha256: str) -> int | None:
        ...


class FolderBlobs:
    """Blobs as files in ``root/blobs/ab/<sha256>``."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Remove the temp files of writers killed mid-write (``blobs/tmp/PID-...``): those of a
        process that is gone, and any older than STALE_TMP_S (a pid reused, another host's)."""
        tmp_dir = self.root / "blobs" / "tmp"
        try:
            entries = list(os.scandir(tmp_dir))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            pid = entry.name.split("-", 1)[0]
            try:
                age_s = now - entry.stat(follow_symlinks=False).st_mtime
                if age_s > STALE_TMP_S or (age_s > 60 and pid.isdigit() and not _pid_alive(int(pid))):
                    os.unlink(entry.path)
            except OSError:
                continue

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)       # never build a path from anything but a sha256
        return self.root / "blobs" / sha256[:2] / sha256

    def tmp_path(self) -> Path:
        """A fresh temp file path on the blobs' file system (rename is atomic)."""
        tmp_dir = self.root / "blobs" / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        return tmp_dir / f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(8)}"

    def has(self, sha256: str) -> bool:
        return file_sha256(self.path(sha256)) == sha256

    def get(self, sha256: str) -> bytes | None:
        try:
            data = self.path(sha256).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    def put(self, data: bytes, sha256: str) -> None:
        """Durable when it returns: a temp file in ``blobs/tmp`` (written, fsynced), renamed into
        place, the folder fsynced. Every push writes one blob, so this is leaner than
        formats.atomic (no scan of the folder for leftovers: those are cleaned at start)."""
        path = self.path(sha256)
        if self.has(sha256):
            return
        tmp: Path | None = self.tmp_path()
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(str(tmp), path)
            tmp = None
            fsync_dir(path.parent)
        except OSError as exc:
            raise BlobError(f"cannot write blob {sha256[:12]} to {path.parent} ({exc.strerror or exc})",
                            "check the store folder's disk space and permissions") from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def adopt(self, tmp: Path, sha256: str) -> None:
        path = self.path(sha256)
        if not self.has(sha256):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            fsync_dir(path.parent)

    def local_file(self, sha256: str) -> Path | None:
        return self.path(sha256) if self.has(sha256) else None

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except OSError:
            return None


BLOB_SCHEMA_POSTGRESQL = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size_bytes BIGINT NOT NULL,
    chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (sha256, seq)
)
"""
# Chunks are stored out of line and uncompressed (STORAGE EXTERNAL): PostgreSQL's default pglz
# compression found the JSON header at the start of a delta compressible and then compressed all of
# its 150 kB of quantized values, which barely shrink: ~2 ms of database CPU per push, more than
# the rest of the push's database work. Changed only when needed (ALTER TABLE takes a brief
# exclusive lock, and every replica runs this when it starts).
BLOB_STORAGE_POSTGRESQL = (
    "SELECT attstorage FROM pg_attribute WHERE attrelid = 'blob_chunks'::regclass AND attname = 'data'",
    "ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
)


class DatabaseBlobs:
    """Blobs in PostgreSQL (chunked), with a verified local copy per API process in ``cache``."""

    kind = "database"

    def __init__(self, cursor: Callable[..., AbstractContextManager[Any]], cache: FolderBlobs) -> None:
        self._cursor = cursor          # Store._cursor: cursor(transaction=True) commits its statements together
        self.cache = cache

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        with self._cursor() as cur:
            cur.execute("SELECT chunks FROM blobs WHERE sha256 = ?", (sha256,))
            row = cur.fetchone()
            if row is None:
                return
            for seq in range(int(row[0])):     # one chunk at a time: a 1 GB blob never sits in memory
                cur.execute("SELECT data FROM blob_chunks WHERE sha256 = ? AND seq = ?", (sha256, seq))
                part = cur.fetchone()
                if part is None:
                    raise BlobError(f"blob {sha256[:12]} lacks chunk {seq}", "upload the file again")
                yield bytes(part[0])

    def has(self, sha256: str) -> bool:
        check_sha256(sha256)
        if self.cache.has(sha256):
            return True
        return self.local_file(sha256) is not None

    def get(self, sha256: str) -> bytes | None:
        path = self.local_file(sha256)
        return path.read_bytes() if path is not None else None

    def put(self, data: bytes, sha256: str) -> None:
        check_sha256(sha256)
        self._insert(sha256, len(data), self.chunks_of(data))
        self.cache.put(data, sha256)

    def adopt(self, tmp: Path, sha256: str) -> None:
        check_sha256(sha256)

        def parts() -> Iterator[bytes]:
            with open(tmp, "rb") as f:
                first = True
                while (chunk := f.read(CHUNK_BYTES)) or first:
                    first = False
                    yield chunk

        self._insert(sha256, tmp.stat().st_size, parts())
        self.cache.adopt(tmp, sha256)

    def _insert(self, sha256: str, size: int, parts: Iterator[bytes]) -> None:
        with self._cursor() as cur:
            cur.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (sha256,))
            if cur.fetchone() is not None:
                return
        # Chunks and row in one transaction: another replica sees the whole blob or none of it.
        try:
            with self._cursor(transaction=True) as cur:
                self.insert_with(cur, sha256, size, parts)
        except Exception as exc:
            raise BlobError(f"cannot store blob {sha256[:12]} in the database ({type(exc).__name__}: {exc})",
                            "check the database's disk space and connection") from exc

    @staticmethod
    def insert_with(cur: Any, sha256: str, size: int, parts: Iterator[bytes]) -> None:
        """The blob's statements on a caller's cursor (inside the caller's transaction: a pushed
        delta's bytes and its row commit together). Two writers of the same bytes: the second's
        inserts do nothing."""
        n = 0
        for n, chunk in enumerate(parts, start=1):
            cur.execute("INSERT INTO blob_chunks (sha256, seq, data) VALUES (?, ?, ?) "
                        "ON CONFLICT (sha256, seq) DO NOTHING", (sha256, n - 1, chunk))
        cur.execute("INSERT INTO blobs (sha256, size_bytes, chunks) VALUES (?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                    (sha256, size, n))

    @staticmethod
    def chunks_of(data: bytes) -> Iterator[bytes]:
        return (data[i:i + CHUNK_BYTES] for i in range(0, max(len(data), 1), CHUNK_BYTES))

    @staticmethod
    def insert_ctes(sha256: str, data: bytes) -> tuple[list[str], list[Any]]:
        """The blob's inserts as members of a caller's ``WITH`` statement (``?`` placeholders):
        a pushed delta's chunks, blob row, delta row and heartbeat go in ONE statement, one round
        trip and one commit (store.put_delta). Same bytes twice: the second inserts nothing."""
        view = memoryview(data)
        chunks = [view[i:i + CHUNK_BYTES] for i in range(0, max(len(data), 1), CHUNK_BYTES)]
        rows = ", ".join("(?, ?, ?)" for _ in chunks)
        return ([f"blob_chunks_in AS (INSERT INTO blob_chunks (sha256, seq, data) VALUES {rows} "
                 "ON CONFLICT (sha256, seq) DO NOTHING)",
                 "blobs_in AS (INSERT INTO blobs (sha256, size_bytes, chunks) VALUES (?, ?, ?) "
                 "ON CONFLICT (sha256) DO NOTHING)"],
                [x for seq, chunk in enumerate(chunks) for x in (sha256, seq, chunk)] + [sha256, len(data), len(chunks)])

    def local_file(self, sha256: str) -> Path | None:
        """The cache's copy when it hashes to its name; else fetched from the database (chunk by
        chunk, hashed on the way), written atomically into the cache; None if missing or damaged."""
        path = self.cache.path(sha256)
        if self.cache.has(sha256):
            return path
        tmp = self.cache.tmp_path()
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                found = False
                for chunk in self._chunks(sha256):
                    found = True
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if not found or digest.hexdigest() != sha256:
                return None
            self.cache.adopt(tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def size(self, sha256: str) -> int | None:
        with self._cursor() as cur:
            cur.execute("SELECT size_bytes FROM blobs WHERE sha256 = ?", (sha256,))
            row = cur.fetchone()
        return int(row[0]) if row else None
