"""The device's side of sync: push deltas to the fleet server, keep them in an outbox when offline.

stdlib only (urllib): a device installs nothing for this beyond edgecl's core.

- ``push_files``: each delta is POSTed to ``SERVER/v1/deltas`` with the device token. Network
  failures, timeouts, 5xx, 408 and 429 are retried with exponential backoff and jitter, a bounded
  number of times; any other 4xx is a rejection (the file is wrong, retrying cannot help).
- A delta that could not be sent is copied into the outbox (default ``~/.edgecl/outbox``, or
  ``$EDGECL_OUTBOX``), named by its sha256, atomically; ``flush_outbox`` (``edgecl push --outbox``)
  sends them later and removes each one the server has acknowledged. Rejected outbox files are
  moved to ``outbox/rejected/`` with the reason beside them, never retried forever.
- Exit codes (``exit_code``): 0 sent or already on the server, 2 rejected, 3 unreachable.
- ``api_json`` / ``download``: the same retry rules for the JSON API and for file downloads
  (``edgecl pull``, ``edgecl release``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.errors import EdgeclError
from edgecl.formats import delta as D
from edgecl.formats.atomic import atomic_write_bytes

EXIT_SENT = 0
EXIT_REJECTED = 2
EXIT_UNREACHABLE = 3
EXIT_ALREADY = 0     # a delta the server already has is a success (it was 4 before 0.2)

SENT, ALREADY, REJECTED, UNREACHABLE = "sent", "already_have_it", "rejected", "unreachable"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def default_outbox() -> Path:
    return Path(os.environ.get("EDGECL_OUTBOX", "~/.edgecl/outbox")).expanduser()


@dataclass
class PushResult:
    name: str              # file name (for messages)
    sha256: str            # the delta's identity (sha256 of the file)
    status: str            # sent | already_have_it | rejected | unreachable
    code: str = ""         # server (or local) error code when rejected / unreachable
    message: str = ""      # the reason, one line
    attempts: int = 0

    def line(self) -> str:
        short = self.sha256[:12]
        if self.status == SENT:
            return f"sent {self.name} ({short})"
        if self.status == ALREADY:
            return f"already there {self.name} ({short})"
        if self.status == REJECTED:
            return f"rejected {self.name}: {self.code}: {self.message}"
        return f"unreachable {self.name}: {self.message}"


@dataclass
class RetryPolicy:
    retries: int = 4               # extra attempts after the first
    backoff_s: float = 0.5         # first wait; doubles each time
    max_backoff_s: float = 8.0     # cap on one wait (total wait <= ~15 s with the defaults)
    timeout_s: float = 30.0        # per request

    def delay(self, attempt: int) -> float:
        # Full jitter halves synchronized retries when a whole line reconnects at once.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)


def push_bytes(data: bytes, server: str, token: str, policy: RetryPolicy | None = None, name: str = "delta",
               sleep: Callable[[float], None] = time.sleep) -> PushResult:
    """POST one delta; retry what may succeed later; never raises for network trouble."""
    policy = policy or RetryPolicy()
    sha256 = hashlib.sha256(data).hexdigest()
    url = server.rstrip("/") + "/v1/deltas"
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
    reason = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            sleep(policy.delay(attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                body = _json(response.read())
                status = ALREADY if body.get("status") == "already_have_it" else SENT
                return PushResult(name, sha256, status, attempts=attempt + 1)
        except urllib.error.HTTPError as exc:
            body = _json(exc.read())
            code, message = body.get("error", f"http_{exc.code}"), body.get("message", exc.reason)
            if exc.code not in _RETRY_STATUS:
                return PushResult(name, sha256, REJECTED, code, message, attempt + 1)
            reason = f"server answered {exc.code} ({code})"
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    return PushResult(name, sha256, UNREACHABLE, "unreachable",
                      f"{url}: {reason} after {policy.retries + 1} attempts", policy.retries + 1)


def _json(raw: bytes) -> dict:
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            return body
    return {}


def _local_check(path: Path) -> tuple[bytes | None, PushResult | None]:
    """Read a delta and check its header here, so a damaged file is reported, not queued."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeclError(f"cannot read {path} ({exc.strerror})", "check the delta's path") from exc
    try:
        D.check_length(D.read_header(data), len(data))
    except D.DeltaError as exc:
        return None, PushResult(path.name, hashlib.sha256(data).hexdigest(), REJECTED, exc.code, str(exc))
    return data, None


def queue(data: bytes, outbox: Path) -> Path:
    """Put a delta in the outbox (atomic; named by sha256, so queueing twice keeps one copy)."""
    target = outbox / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    if not target.exists():
        atomic_write_bytes(target, data)
    return target


def push_files(paths: Iterable[str | Path], server: str, token: str, outbox: Path | None = None,
               policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> list[PushResult]:
    """``edgecl push DELTA...``: send each file; the ones that cannot be sent go to the outbox."""
    outbox = outbox or default_outbox()
    results: list[PushResult] = []
    offline = False
    for path in map(Path, paths):
        data, local = _local_check(path)
        if local is not None:
            results.append(local)
            continue
        assert data is not None
        if offline:   # the server was just unreachable: do not wait out the retries once per file
            result = PushResult(path.name, hashlib.sha256(data).hexdigest(), UNREACHABLE, "unreachable",
                                "server unreachable earlier in this run")
        else:
            result = push_bytes(data, server, token, policy, path.name, sleep)
        if result.status == UNREACHABLE:
            offline = True
            result.message += f"; kept in {queue(data, outbox)}"
        results.append(result)
    return results


def flush_outbox(server: str, token: str, outbox: Path | None = None, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> list[PushResult]:
    """``edgecl push --outbox``: send the queued deltas, oldest first; stop at the first unreachable."""
    outbox = outbox or default_outbox()
    files = sorted(outbox.glob("*.safetensors"), key=lambda p: (p.stat().st_mtime, p.name)) if outbox.is_dir() else []
    results: list[PushResult] = []
    for path in files:
        data, local = _local_check(path)
        result = local or push_bytes(data or b"", server, token, policy, path.name, sleep)
        results.append(result)
        if result.status in (SENT, ALREADY):
            path.unlink()
        elif result.status == REJECTED:
            rejected = outbox / "rejected"
            rejected.mkdir(exist_ok=True)
            (rejected / f"{path.name}.reason.txt").write_text(f"{result.code}: {result.message}\n")
            shutil.move(str(path), rejected / path.name)
        else:
            break
    return results


def exit_code(results: list[PushResult]) -> int:
    """2 if anything was rejected, else 3 if anything is still waiting, else 0 (every delta is on
    the server now, sent by this run or already there)."""
    statuses = {r.status for r in results}
    if REJECTED in statuses:
        return EXIT_REJECTED
    if UNREACHABLE in statuses:
        return EXIT_UNREACHABLE
    return EXIT_SENT


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
                    return response.read()
                while chunk := response.read(1 << 20):
                    sink(chunk)
                return b""
        except urllib.error.HTTPError as exc:
            body = _json(exc.read())
            code, message = body.get("error", f"http_{exc.code}"), body.get("message", str(exc.reason))
            if exc.code not in _RETRY_STATUS:
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
    answer = _json(raw)
    if not answer and raw.strip() not in (b"{}",):
        raise ServerUnreachable(f"{server}{path} did not answer JSON", "check the server URL (an edgecl server?)")
    return answer


def upload(server: str, token: str, path: str, data_path: Path, policy: RetryPolicy | None = None,
           sleep: Callable[[float], None] = time.sleep) -> dict:
    """PUT a file's bytes (a bundle file to ``/v1/blobs/{sha256}``)."""
    raw = _request(server, token, "PUT", path, data_path.read_bytes(), "application/octet-stream",
                   policy or RetryPolicy(), sleep)
    return _json(raw)


ENCODING_HEADER = "X-Edgecl-Encoding"


class _Sink:
    """Writes a download to a file, decoding it (zlib, or zlib of old XOR new against ``old``) and
    hashing the decoded bytes on the way; never writes more than ``limit`` bytes (a zlib bomb is
    refused, not expanded)."""

    def __init__(self, f: Any, old: bytes | None = None, limit: int | None = None) -> None:
        self.f, self.digest, self.size, self.wire = f, hashlib.sha256(), 0, 0
        self.old, self.limit, self.mode, self.z = old, limit, "identity", None

    def headers(self, headers: Any) -> None:
        import zlib

        self.mode = headers.get(ENCODING_HEADER, "identity") or "identity"
        if self.mode not in ("identity", "zlib", "xor-zlib") or (self.mode == "xor-zlib" and self.old is None):
            raise EdgeclError(f"the server sent an unknown encoding {self.mode[:40]!r}", "update edgecl on the device")
        if self.mode != "identity":
            self.z = zlib.decompressobj()  # type: ignore[assignment]

    def _write(self, data: bytes) -> None:
        if self.limit is not None and self.size + len(data) > self.limit:
            raise EdgeclError(f"a download decodes to more than its {self.limit:,} bytes", "refused: run the command again")
        if self.mode == "xor-zlib":
            assert self.old is not None
            old = self.old[self.size:self.size + len(data)]
            if len(old) != len(data):
                raise EdgeclError("a patch is longer than the file it patches", "refused: run the command again")
            data = (int.from_bytes(data, "little") ^ int.from_bytes(old, "little")).to_bytes(len(data), "little")
        self.digest.update(data)
        self.f.write(data)
        self.size += len(data)

    def __call__(self, chunk: bytes) -> None:
        self.wire += len(chunk)
        if self.z is None:
            self._write(chunk)
            return
        data = self.z.decompress(chunk, (self.limit or (1 << 40)) - self.size + 1)
        self._write(data)
        while self.z.unconsumed_tail:
            self._write(self.z.decompress(self.z.unconsumed_tail, (self.limit or (1 << 40)) - self.size + 1))

    def finish(self) -> None:
        if self.z is not None:
            self._write(self.z.flush())


def download(server: str, token: str, path: str, dest: Path, expected_sha256: str,
             policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
             old: Path | None = None, size: int | None = None, compressed: bool = False) -> int:
    """GET ``path`` into ``dest`` (streamed, fsynced), checking the sha256 of what was written;
    returns the bytes that crossed the network. A file whose bytes do not hash to
    ``expected_sha256`` is deleted and refused. ``compressed``: ask for zlib; ``old`` (a local file
    of the same ``size``): ask for a patch against it (``from_sha256``). A broken transfer starts
    again from the first byte (retry rules of the push)."""
    policy = policy or RetryPolicy()
    once = dataclasses.replace(policy, retries=0)
    old_bytes = old.read_bytes() if old is not None and size is not None and old.stat().st_size == size else None
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
            with open(dest, "wb") as f:
                sink = _Sink(f, old_bytes, size)
                _request(server, token, "GET", url_path, None, "", once, sleep, sink, sink.headers)
                sink.finish()
                f.flush()
                os.fsync(f.fileno())
            break
        except ServerUnreachable:
            dest.unlink(missing_ok=True)
            if attempt == policy.retries:
                raise
        except Exception:
            dest.unlink(missing_ok=True)
            raise
    if sink.digest.hexdigest() != expected_sha256:
        dest.unlink(missing_ok=True)
        raise EdgeclError(f"{path.rsplit('/', 1)[-1]} from the server hashes to {sink.digest.hexdigest()[:16]}..., "
                          f"the signed manifest says {expected_sha256[:16]}... (altered or damaged on the way)",
                          "refused, nothing changed: run the command again; if it persists, check the server's store")
    return sink.wire
