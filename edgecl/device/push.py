"""``edgecl push``: send deltas to the fleet server, keep them in an outbox when offline.

- ``push_files``: each delta is POSTed to ``SERVER/v1/deltas`` with the device token, under the
  shared client's retry rules (``edgecl.http_client.RetryPolicy``); any other 4xx is a rejection.
- A delta that could not be sent is copied into the outbox (default ``~/.edgecl/outbox``, or
  ``$EDGECL_OUTBOX``), named by its sha256, atomically; ``flush_outbox`` (``edgecl push --outbox``)
  sends them later and removes each one the server has acknowledged. Rejected outbox files are
  moved to ``outbox/rejected/`` with the reason beside them, never retried forever.
- Exit codes (``exit_code``): 0 sent or already on the server, 2 rejected, 3 unreachable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgecl.errors import EdgeclError
from edgecl.formats import delta as D
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.http_client import RETRY_STATUS, RetryPolicy, parse_json_object

EXIT_SENT = 0
EXIT_REJECTED = 2
EXIT_UNREACHABLE = 3

SENT, ALREADY, REJECTED, UNREACHABLE = "sent", "already_have_it", "rejected", "unreachable"


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
                body = parse_json_object(response.read())
                status = ALREADY if body.get("status") == "already_have_it" else SENT
                return PushResult(name, sha256, status, attempts=attempt + 1)
        except urllib.error.HTTPError as exc:
            body = parse_json_object(exc.read())
            code, message = body.get("error", f"http_{exc.code}"), body.get("message", exc.reason)
            if exc.code not in RETRY_STATUS:
                return PushResult(name, sha256, REJECTED, code, message, attempt + 1)
            reason = f"server answered {exc.code} ({code})"
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    return PushResult(name, sha256, UNREACHABLE, "unreachable",
                      f"{url}: {reason} after {policy.retries + 1} attempts", policy.retries + 1)


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
