"""Atomic writes: a reader (or a power cut) sees the old file or the new one, never half of one.

Files: write to a temp file in the same folder, fsync, rename over the target, fsync the folder.
Folders: build everything in a temp sibling folder, then swap it into place. On Linux the swap is
one ``renameat2(RENAME_EXCHANGE)`` (man 2 rename), so there is no moment at which neither the old
nor the new folder sits at the path; elsewhere (or on a file system that refuses the flag) the old
folder is renamed aside, the new one renamed in, then the old one removed, and a crash between the
two renames is repaired by the next write in that folder (the old folder is put back).

Temp names carry the writer's pid (``.NAME.tmp-PID-RANDOM``, ``.NAME.old-PID-RANDOM``): the next
write in the same folder removes those of dead processes, and those older than an hour of any other
process (a pid reused after a reboot), so a killed run does not leave its half-written bundle on a
small device disk forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError

STALE_AFTER_S = 3600.0   # a temp name of a live pid older than this is a leftover of a reused pid
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2     # linux/fs.h


def fsync_dir(path: Path) -> None:
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


def temp_prefix(target: Path, kind: str = "tmp") -> str:
    """``.NAME.tmp-PID-``: the prefix of this process's temp siblings of ``target``."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(folder: str | Path, now: float | None = None) -> list[Path]:
    """Remove the temp files/folders of killed writers in ``folder``; returns what was removed.

    An ``.old-`` folder whose target is missing is what a crash between the two renames of the
    fallback swap leaves: it is renamed back instead of removed (it is the last complete version)."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match:
            continue
        pid = int(match["pid"])
        if pid == os.getpid():
            continue  # ours: in use by an enclosing write
        try:
            age_s = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if _pid_alive(pid) and age_s < STALE_AFTER_S:
            continue
        path = Path(entry.path)
        target = folder / match["name"]
        with contextlib.suppress(OSError):
            if match["kind"] == "old" and not target.exists():
                os.rename(path, target)
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    target = Path(path)
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), dir=target.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        fsync_dir(target.parent)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _libc_renameat2():  # noqa: ANN202 - the C function or None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux RENAME_EXCHANGE); False where that is not available."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the file system does not know the flag: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target``; the previous ``target`` (if any) is removed."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if exchange_paths(tmp, target):
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = target.with_name(temp_prefix(target, "old") + secrets.token_hex(4))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # put the old one back before reporting
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``path``, on any error it is removed."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise EdgeclError(f"{target} already exists", "pass --overwrite or choose another output folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _swap_into_place(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
