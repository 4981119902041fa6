"""Connection limits uvicorn does not have: a header deadline and a per-client connection cap.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) and caps the whole server
(``limit_concurrency``), but a connection that sends its request headers one byte a minute
(slow loris) is never dropped, and one client may open every connection the server has. This
subclass of uvicorn's httptools protocol adds:

- a header deadline: from the moment a connection opens (or finishes a response and may start a
  new request) the client has ``header_timeout_s`` to complete its request headers, or the
  connection is closed;
- a per-client cap: at most ``max_connections_per_client`` open connections per client address
  (per API process); the next one gets a JSON 503 and is closed. Behind a reverse proxy every
  client has the proxy's address: set the cap to 0 (off) there and let the proxy limit clients.

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


LIMITS = ConnectionLimits()                  # set by serve() / the worker factory before uvicorn starts
_OPEN: dict[str, int] = {}                   # client address -> open connections (one event loop per process)

_BUSY = json.dumps({"error": "too_many_connections",
                    "message": "too many connections from this address: close idle connections or "
                               "raise the server's --max-connections-per-client"}).encode()


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
        if cap and _OPEN.get(host, 0) >= cap:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)
            transport.close()
            return
        self._counted = host
        _OPEN[host] = _OPEN.get(host, 0) + 1
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._disarm()
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
        super().on_headers_complete()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        # The next request's head must come in time too; a pipelined request that has already
        # started (its head is complete) is not timed.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
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
