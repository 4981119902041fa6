"""The folder blob store's own write path (edgecl/server/blobs.py): durable, verified, and the temp
files of a writer killed mid-write are cleaned when the store is opened again. Real files in tmp_path."""

from __future__ import annotations

import hashlib
import os
import time

from edgecl.server.blobs import FolderBlobs


def test_put_stores_verified_bytes_and_leaves_no_temp_file(tmp_path):
    blobs = FolderBlobs(tmp_path)
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    blobs.put(data, sha)
    assert blobs.path(sha).read_bytes() == data and blobs.has(sha)
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == [], "the temp file was renamed into place"
    blobs.path(sha).write_bytes(data[:-1])            # damaged (a crash, bit rot): rewritten by the next put
    assert not blobs.has(sha)
    blobs.put(data, sha)
    assert blobs.path(sha).read_bytes() == data


def test_leftover_temp_files_of_dead_writers_are_removed_at_open(tmp_path):
    tmp_dir = tmp_path / "blobs" / "tmp"
    tmp_dir.mkdir(parents=True)
    dead = tmp_dir / "999999999-1-deadbeef"           # no such pid: a writer killed mid-write
    mine_recent = tmp_dir / f"{os.getpid()}-1-cafe"   # a live writer's file: kept
    ancient = tmp_dir / f"{os.getpid()}-2-old"        # older than STALE_TMP_S: removed whoever wrote it
    for path in (dead, mine_recent, ancient):
        path.write_bytes(b"partial")
    old = time.time() - 120
    os.utime(dead, (old, old))
    os.utime(ancient, (time.time() - 7200, time.time() - 7200))
    FolderBlobs(tmp_path)
    assert not dead.exists() and not ancient.exists()
    assert mine_recent.exists()
