"""What every router shares: the app's settings, authentication, id checks and body reading.

The store and the limits live on ``request.app.state`` (set once by ``create_app``), so a route
is a plain module-level function and a router needs nothing from the factory.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import Query, Request, Security
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from edgecl.formats import delta as D
from edgecl.server.limits import DEFAULT_BODY_IDLE_S, JSON_LIMIT_BYTES, MIN_BODY_RATE_BPS, UploadLimits
from edgecl.server.service import Rejected, authenticate
from edgecl.server.store import MAX_DB_INT, SHA_RE, Store

_bearer = HTTPBearer(auto_error=False, description="The device's or admin's token (edgecl server device add)")
AUTH = [Security(_bearer)]             # documents the scheme in OpenAPI so /docs can send the token
Version = Annotated[int, Query(ge=1, le=MAX_DB_INT)]


def store_of(request: Request) -> Store:
    return request.app.state.store


def limits_of(request: Request) -> UploadLimits:
    return request.app.state.limits


async def auth(request: Request, admin: bool = False):  # noqa: ANN201 - service.Device
    return await run_in_threadpool(authenticate, store_of(request), request.headers.get("authorization"), admin)


def check_sha(value: str) -> str:
    # Ids in URLs are sha256s only: nothing a client sends ever becomes a path.
    if not SHA_RE.fullmatch(value):
        raise Rejected("bad_id", 400, f"{value[:80]!r} is not a sha256", "use the 64-hex-digit id from the list")
    return value


def check_name(value: str, what: str) -> str:
    if not D.NAME_RE.fullmatch(value):
        raise Rejected("bad_id", 400, f"{what} {value[:80]!r} is not a name", "use the names the API lists")
    return value


def check_version(value: int) -> int:
    if not 1 <= value <= MAX_DB_INT:
        raise Rejected("bad_request", 422, f"version {value} is out of range [1, {MAX_DB_INT}]", "pass a real version")
    return value


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise Rejected("bad_request", 400, "Content-Length is not a number", "send a valid HTTP request")
    return int(value)


async def json_body(request: Request) -> Any:
    reader = BodyReader(request, JSON_LIMIT_BYTES, limits_of(request).body_idle_s)
    await reader.fill(JSON_LIMIT_BYTES + 1)
    try:
        return json.loads(bytes(reader.buf))
    except ValueError as exc:
        raise Rejected("bad_request", 400, f"the body is not JSON ({exc})", "send a JSON object") from exc


async def _within(awaitable: Any, seconds: float) -> Any:
    """``await awaitable`` or TimeoutError after ``seconds``. asyncio.timeout (Python 3.11+) is a
    timer on the running task; wait_for also wraps the awaitable in a new task, which costs more
    than it does here, once per body chunk (several per pushed delta)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


async def body_chunks(request: Request, idle_s: float):  # noqa: ANN201 - async iterator of bytes
    """The request body, chunk by chunk; 408 when the client sends nothing for ``idle_s``, or
    trickles it (under MIN_BODY_RATE_BPS on average once ``idle_s`` has passed: a byte every few
    seconds would otherwise hold a connection for days)."""
    stream = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    while True:
        try:
            chunk = await _within(stream.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except (asyncio.TimeoutError, TimeoutError):
            raise Rejected("timeout", 408, f"no request body bytes for {idle_s:g} s",
                           "send the body without pausing (check the network)") from None
        received += len(chunk)
        elapsed = loop.time() - started
        if elapsed > idle_s and received < MIN_BODY_RATE_BPS * elapsed:
            raise Rejected("timeout", 408, f"the body arrives at {received / elapsed:.0f} B/s, under "
                           f"{MIN_BODY_RATE_BPS} B/s", "send the body at network speed (check the network)")
        yield chunk


class BodyReader:
    """Reads the request body incrementally, never holding more than ``limit`` bytes."""

    def __init__(self, request: Request, limit: int, idle_s: float = DEFAULT_BODY_IDLE_S) -> None:
        self.buf = bytearray()
        self._stream = body_chunks(request, idle_s).__aiter__()
        self._limit = limit
        self._done = False

    async def fill(self, n: int) -> None:
        while len(self.buf) < n and not self._done:
            try:
                chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            self.buf += chunk
            if len(self.buf) > self._limit:
                raise Rejected("too_large", 413, f"the upload is over the {self._limit}-byte cap",
                               "push a smaller delta or raise the server's --max-upload-mb")
