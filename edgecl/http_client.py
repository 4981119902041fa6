"""The HTTP client every side shares with the fleet server: the JSON API, uploads, downloads.

stdlib only (urllib): a device installs nothing for this beyond edgecl's core. Used by the device
(``edgecl push``, ``edgecl pull``), the host-side release (``edgecl release``) and the CLI's admin
commands, so it belongs to no side (tests/test_import_contract.py).

- ``RetryPolicy``: network failures, timeouts, 5xx, 408 and 429 are retried with exponential
  backoff and jitter, a bounded number of times; any other 4xx is a rejection (``ServerRejected``:
  the request is wrong, retrying cannot help).
- ``api_json`` / ``upload`` / ``download``: the JSON API, file uploads and streamed, hashed,
  size-capped file downloads under those rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}   # worth another try; any other 4xx is a rejection
MAX_ANSWER_BYTES = 64 << 20    # the largest JSON answer read (the admin device list of a 100k fleet fits)


@dataclass
class RetryPolicy:
    retries: int = 4               # extra attempts after the first
    backoff_s: float = 0.5         # first wait; doubles each time
    max_backoff_s: float = 8.0     # cap on one wait (total wait <= ~15 s with the defaults)
    timeout_s: float = 30.0        # per request

    def delay(self, attempt: int) -> float:
        # Full jitter halves synchronized retries when a whole line reconnects at once.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)


def parse_json_object(raw: bytes) -> dict:
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            return body
    return {}


# -- the JSON API and downloads (pull, release) ----------------------------------------------------------
class ServerRejected(EdgeclError):
    """The server answered with a 4xx (its JSON error code is ``code``)."""

    def __init__(self, code: str, status: int, message: str) -> None:
        problem, _, fix = message.partition(": ")
        super().__init__(f"the server refused ({code}): {problem}", fix or "see docs/server.md")
        self.code = code
        self.status = status


class ServerUnreachable(EdgeclError):
    """No answer (network, timeout, 5xx) after the retries."""


class MalformedAnswer(EdgeclError):
    """The server answered, but not what the API says (not JSON, or fields of the wrong type)."""


def _request(server: str, token: str, method: str, path: str, data: bytes | None, content_type: str,
             policy: RetryPolicy, sleep: Callable[[float], None], sink: Callable[[bytes], None] | None = None,
             on_headers: Callable[[Any], None] | None = None) -> bytes:
    url = server.rstrip("/") + path
    reason = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            sleep(policy.delay(attempt - 1))
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                if on_headers is not None:
                    on_headers(response.headers)
                if sink is None:
                    # An API answer is read whole: an endless one must not take the memory.
                    data = response.read(MAX_ANSWER_BYTES + 1)
                    if len(data) > MAX_ANSWER_BYTES:
                        raise MalformedAnswer(f"{url} answered more than {MAX_ANSWER_BYTES:,} bytes",
                                              "check the server URL (an edgecl server of this version?)")
                    return data
                while chunk := response.read(1 << 20):
                    sink(chunk)
                return b""
        except urllib.error.HTTPError as exc:
            body = parse_json_object(exc.read())
            code, message = body.get("error", f"http_{exc.code}"), body.get("message", str(exc.reason))
            if exc.code not in RETRY_STATUS:
                raise ServerRejected(code, exc.code, message) from None
            reason = f"server answered {exc.code} ({code})"
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise ServerUnreachable(f"{url}: {reason} after {policy.retries + 1} attempts",
                            "check the server URL and the network, then run the command again")


def api_json(server: str, token: str, method: str, path: str, body: object = None,
             policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> dict:
    """One JSON API call with the push's retry rules; ServerRejected on a 4xx."""
    data = json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT") else None)
    raw = _request(server, token, method, path, data, "application/json", policy or RetryPolicy(), sleep)
    answer = parse_json_object(raw)
    if not answer and raw.strip() not in (b"{}",):
        raise MalformedAnswer(f"{server}{path} answered something that is not a JSON object",
                              "check the server URL (an edgecl server of this version?)")
    return answer


def upload(server: str, token: str, path: str, data_path: Path, policy: RetryPolicy | None = None,
           sleep: Callable[[float], None] = time.sleep) -> dict:
    """PUT a file's bytes (a bundle file to ``/v1/blobs/{sha256}``)."""
    raw = _request(server, token, "PUT", path, data_path.read_bytes(), "application/octet-stream",
                   policy or RetryPolicy(), sleep)
    return parse_json_object(raw)


ENCODING_HEADER = "X-Edgecl-Encoding"
ZDICT_BYTES = 32 * 1024   # dict-zlib: the old file's last 32 KiB (zlib's window) is the preset dictionary
# A download's size comes from the signed manifest; when nothing says how big a file is (an older
# release, a host-side download), no response may write more than this (an endless answer must
# not fill the disk). EfficientNet-Lite0's largest bundle file is 13 MB.
MAX_DOWNLOAD_BYTES = 1 << 30
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class DiskError(EdgeclError):
    """Writing a download failed on this machine's disk (full, quota, read-only): not the
    network's fault, so never retried."""


def disk_error(path: Path, exc: OSError) -> DiskError:
    """The one-line error for a disk failure while writing ``path``."""
    # The same words as edgecl.formats.atomic's, which reports the pull's other writes.
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file grew past the file-size limit", errno.EROFS: "the disk is read-only"}
    return DiskError(f"{what.get(exc.errno or 0, exc.strerror or 'the disk failed')} while writing {path}",
                     f"free space on the disk holding {path.parent} (or pass another folder), then run the "
                     "command again; nothing was changed")


class _Sink:
    """Writes a download to a file, decoding it (zlib, or zlib of old XOR new against ``old``) and
    hashing the decoded bytes on the way; never writes more than ``limit`` bytes (a zlib bomb or an
    endless answer is refused, not written) and never takes in much more than that from the wire."""

    def __init__(self, f: Any, path: Path, limit: int, old: bytes | None = None) -> None:
        self.f, self.path, self.digest, self.size, self.wire = f, path, hashlib.sha256(), 0, 0
        self.old, self.limit, self.mode, self.z = old, limit, "identity", None

    def headers(self, headers: Any) -> None:
        import zlib

        self.mode = headers.get(ENCODING_HEADER, "identity") or "identity"
        if (self.mode not in ("identity", "zlib", "xor-zlib", "dict-zlib")
                or (self.mode in ("xor-zlib", "dict-zlib") and self.old is None)):
            raise EdgeclError(f"the server sent an unknown encoding {self.mode[:40]!r}", "update edgecl on the device")
        if self.mode == "dict-zlib":    # zlib whose preset dictionary is the old file's last 32 KiB
            assert self.old is not None
            self.z = zlib.decompressobj(zdict=self.old[-ZDICT_BYTES:])  # type: ignore[assignment]
        elif self.mode != "identity":
            self.z = zlib.decompressobj()  # type: ignore[assignment]

    def _too_big(self) -> EdgeclError:
        return EdgeclError(f"{self.path.name} from the server is larger than the {self.limit:,} bytes it may have",
                           "refused, nothing kept: run the command again; if it persists, check the server")

    def _write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise self._too_big()
        if self.mode == "xor-zlib":
            assert self.old is not None
            old = self.old[self.size:self.size + len(data)]
            if len(old) != len(data):
                raise EdgeclError("a patch is longer than the file it patches", "refused: run the command again")
            data = (int.from_bytes(data, "little") ^ int.from_bytes(old, "little")).to_bytes(len(data), "little")
        self.digest.update(data)
        try:
            self.f.write(data)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise disk_error(self.path, exc) from None
            raise
        self.size += len(data)

    def __call__(self, chunk: bytes) -> None:
        self.wire += len(chunk)
        # zlib never expands data by more than 0.1% + a few bytes: far more on the wire than the
        # file may hold is an endless or padded answer.
        if self.wire > self.limit + self.limit // 64 + (1 << 16):
            raise self._too_big()
        if self.z is None:
            self._write(chunk)
            return
        if self.z.eof:
            raise EdgeclError(f"{self.path.name} from the server has bytes after its end", "refused: run the command again")
        data = self.z.decompress(chunk, self.limit - self.size + 1)
        self._write(data)
        while self.z.unconsumed_tail:
            self._write(self.z.decompress(self.z.unconsumed_tail, self.limit - self.size + 1))

    def finish(self) -> None:
        if self.z is not None:
            self._write(self.z.flush())


def download(server: str, token: str, path: str, dest: Path, expected_sha256: str,
             policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
             old: Path | None = None, size: int | None = None, compressed: bool = False,
             max_bytes: int = MAX_DOWNLOAD_BYTES) -> int:
    """GET ``path`` into ``dest`` (streamed, fsynced), checking the sha256 of what was written;
    returns the bytes that crossed the network. A file whose bytes do not hash to
    ``expected_sha256`` is deleted and refused. ``size``: the file's size when known (from the
    signed manifest): nothing longer is written; otherwise at most ``max_bytes``. ``compressed``:
    ask for zlib; ``old`` (a local file under the same name): ask for a patch against it
    (``from_sha256``: zlib of old XOR new for one of the same size, zlib with the old file as
    preset dictionary for another). A broken transfer starts again from the first byte (retry rules of the
    push); a disk failure (``DiskError``) and a refusal are not retried."""
    policy = policy or RetryPolicy()
    once = dataclasses.replace(policy, retries=0)
    limit = min(size, max_bytes) if size is not None else max_bytes
    # A file the device has under this name: of the same size, the server may send old XOR new; of
    # another, zlib with the old file as dictionary. The server says which (or neither).
    old_bytes = old.read_bytes() if old is not None and size is not None and old.is_file() else None
    query = []
    if compressed:
        query.append("encoding=zlib")
    if old_bytes is not None:
        query.append(f"from_sha256={hashlib.sha256(old_bytes).hexdigest()}")
    url_path = path + ("?" + "&".join(query) if query else "")
    for attempt in range(policy.retries + 1):
        if attempt:
            sleep(policy.delay(attempt - 1))
        try:
            try:
                with open(dest, "wb") as f:
                    sink = _Sink(f, dest, limit, old_bytes)
                    _request(server, token, "GET", url_path, None, "", once, sleep, sink, sink.headers)
                    sink.finish()
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:     # opening, flushing or closing the file (the network's own are caught inside)
                if exc.errno in DISK_ERRNOS:
                    raise disk_error(dest, exc) from None
                raise
            break
        except ServerUnreachable:
            dest.unlink(missing_ok=True)
            if attempt == policy.retries:
                raise
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    if sink.digest.hexdigest() != expected_sha256:
        dest.unlink(missing_ok=True)
        raise EdgeclError(f"{path.rsplit('/', 1)[-1]} from the server hashes to {sink.digest.hexdigest()[:16]}..., "
                          f"the signed manifest says {expected_sha256[:16]}... (altered or damaged on the way)",
                          "refused, nothing changed: run the command again; if it persists, check the server's store")
    return sink.wire
