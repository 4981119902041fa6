"""Connection limits uvicorn does not have: a header deadline, a per-client cap and a connection budget.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) and caps the whole server
(``limit_concurrency``), but a connection that sends its request headers one byte a minute
(slow loris) is never dropped, and one client may open every connection the server has. This
subclass of uvicorn's httptools protocol adds:

- a header deadline: from the moment a connection opens (or finishes a response and may start a
  new request) the client has ``header_timeout_s`` to complete its request headers, or the
  connection is closed;
- a per-client cap: at most ``max_connections_per_client`` open connections per client address
  (per API process); the next one gets a JSON 503 and is closed. Behind a reverse proxy every
  client has the proxy's address: set the cap to 0 (off) there and let the proxy limit clients;
- a connection budget that a slow loris from many addresses cannot exhaust: at most
  ``max_connections`` open connections per API process; when a new one arrives at the budget, the
  oldest connection that is only waiting for a request head is closed to make room (first those
  that never completed a request, then idle keep-alive ones). A connection whose request head has
  arrived (a device pushing, an admin, /health) is never shed, and a new client only needs its
  head to arrive before the next newcomer (milliseconds), so /health, admins and established
  devices keep being served while stalled connections churn. Only when every connection is busy
  with a request does a newcomer get the JSON 503. (uvicorn's own ``limit_concurrency`` answered
  503 to every request once stalled connections filled it: measured, 20 of 23 /health probes
  under 1,200 stalled connections from 20 addresses.)

Body reads have their own idle timeout in the app (``routes.common.BodyReader``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is in the server extra; without it: uvicorn's defaults
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


@dataclass
class ConnectionLimits:
    header_timeout_s: float = 10.0           # to send a complete request head
    max_connections_per_client: int = 64     # per client address and API process; 0 = no cap
    max_connections: int = 1024              # open connections per API process (the budget); 0 = no budget


LIMITS = ConnectionLimits()                  # set by serve() / the worker factory before uvicorn starts
_OPEN: dict[str, int] = {}                   # client address -> open connections (one event loop per process)
_ALL: set[Any] = set()                       # every counted connection of this process
_FRESH: dict[Any, None] = {}                 # waiting for their first request head, oldest first
_IDLE: dict[Any, None] = {}                  # keep-alive, waiting for their next request head, oldest first


def uvicorn_limit_concurrency(max_connections: int) -> int | None:
    """uvicorn's limit_concurrency (connections + requests in flight) above the budget, so the
    budget, which sheds stalled connections, decides first and uvicorn's blanket 503 never does."""
    return 2 * max_connections + 16 if max_connections else None

_BUSY = json.dumps({"error": "too_many_connections",
                    "message": "too many connections from this address: close idle connections or "
                               "raise the server's --max-connections-per-client"}).encode()
_FULL = json.dumps({"error": "too_many_connections",
                    "message": "every connection of the server is serving a request: retry later, or raise "
                               "the server's --max-connections"}).encode()


def _make_room() -> bool:
    """Room for one more connection within the budget, shedding the oldest connection that waits
    for a request head (never-used first, then idle keep-alive); False when all are busy."""
    budget = LIMITS.max_connections
    if not budget or len(_ALL) < budget:
        return True
    for waiting in (_FRESH, _IDLE):
        while waiting:
            oldest = next(iter(waiting))
            waiting.pop(oldest, None)
            _ALL.discard(oldest)        # counted out now: its connection_lost comes on a later loop turn
            if not oldest.transport.is_closing():
                oldest.transport.close()
                return True
    return len(_ALL) < budget


def protocol_class() -> Any:
    """The limited protocol, or uvicorn's choice ("auto") when httptools is not installed."""
    if HttpToolsProtocol is None:
        import warnings

        warnings.warn("httptools is not installed: no header deadline and no per-client connection cap "
                      "(pip install 'edgecl[server]')", stacklevel=2)
        return "auto"
    return LimitedHttpToolsProtocol


class LimitedHttpToolsProtocol(HttpToolsProtocol or object):  # type: ignore[misc]
    _deadline: asyncio.TimerHandle | None = None
    _counted: str | None = None

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        cap = LIMITS.max_connections_per_client
        if (cap and _OPEN.get(host, 0) >= cap) or not _make_room():
            body = _BUSY if cap and _OPEN.get(host, 0) >= cap else _FULL
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            transport.close()
            return
        self._counted = host
        _OPEN[host] = _OPEN.get(host, 0) + 1
        _ALL.add(self)
        _FRESH[self] = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._disarm()
        _ALL.discard(self)
        _FRESH.pop(self, None)
        _IDLE.pop(self, None)
        if self._counted is not None:
            left = _OPEN.get(self._counted, 1) - 1
            if left > 0:
                _OPEN[self._counted] = left
            else:
                _OPEN.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:  # noqa: D102
        self._disarm()
        _FRESH.pop(self, None)          # serving a request: never shed
        _IDLE.pop(self, None)
        super().on_headers_complete()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        # The next request's head must come in time too; a pipelined request that has already
        # started (its head is complete) is not timed.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            if self in _ALL:
                _IDLE[self] = None
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        if LIMITS.header_timeout_s > 0:
            self._deadline = self.loop.call_later(LIMITS.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
