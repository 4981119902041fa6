"""Atomic writes: a reader (or a power cut) sees the old file or the new one, never half of one.

Files: write to a temp file in the same folder, fsync, rename over the target, fsync the folder.
Folders: build everything in a temp sibling folder, then rename it into place (the previous folder,
if any, is moved aside first and removed only after the new one is in place).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; not supported everywhere (ignore then).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_error(target: Path, exc: OSError) -> EdgeclError:
    if exc.errno == errno.ENOSPC:
        return EdgeclError(f"no space left on the device while writing {target}",
                           "free some disk space and run the command again (the previous file is intact)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgeclError(f"cannot write {target} ({exc.strerror})",
                           "choose a writable location or fix its permissions")
    return EdgeclError(f"cannot write {target} ({exc.strerror or exc})", "check the path and the disk")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    target = Path(path)
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        _fsync_dir(target.parent)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``path``, on any error it is removed."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise EdgeclError(f"{target} already exists", "pass --overwrite or choose another output folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
