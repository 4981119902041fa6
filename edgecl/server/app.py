"""The HTTP API (FastAPI on uvicorn): the app factory and ``serve``. The endpoints live in
``edgecl/server/routes/`` (one router per resource); endpoints and error codes: docs/server.md.

Blocking work (database, hashing, fsync) runs in the thread pool, never on the event loop. Every
error, including a bug's 500 and an unknown route, is one JSON object
``{"error": CODE, "message": "problem: fix"}``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgecl import __version__
from edgecl.server import connlimits
from edgecl.server.jobs import MergeJobs
from edgecl.server.limits import (
    DEFAULT_BODY_IDLE_S,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_MB,
    UploadLimits,
)
from edgecl.server.routes import ROUTERS
from edgecl.server.service import Rejected
from edgecl.server.store import Store

log = logging.getLogger("edgecl.server")

DEFAULT_KEEP_ALIVE_S = 5               # an idle keep-alive connection is closed after this


def create_app(store: Store, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               body_idle_s: float = DEFAULT_BODY_IDLE_S, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> FastAPI:
    """The API over ``store``: every router, the error handlers, and the settings routes read
    from ``app.state``."""
    app = FastAPI(title="edgecl fleet server", version=__version__, docs_url=None, redoc_url=None,
                  description="Devices push deltas (docs/delta-format.md) and pull signed bundle versions; "
                              "ops merge, release and watch them (docs/server.md).")
    app.state.store = store
    app.state.limits = UploadLimits(max_upload_bytes, body_idle_s, max_blob_bytes)
    app.state.merge_jobs = MergeJobs(store)
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _error(code: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        log.warning("%s %s rejected: %s %s", request.method, request.url.path, exc.code, exc)
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        return _error(exc.code, exc.status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error("bad_request", 422, f"{where}: {first.get('msg', 'invalid')}: fix the request (see /docs)")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return _error(code, exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}: "
                      "see /docs for the API")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback; the client still gets the JSON shape.
        log.exception("%s %s failed", request.method, request.url.path)
        return _error("internal", 500, f"internal error ({type(exc).__name__}): the server log has the details; "
                      "report it")


def _die_with_parent(parent_pid: int) -> None:
    """A worker process exits when the process that started it is gone, even after kill -9 of the
    parent (which cannot clean up): PR_SET_PDEATHSIG on Linux, and a watchdog thread everywhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)    # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:     # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        import time

        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="edgecl-parent-watch", daemon=True).start()


def create_app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes (``serve(workers=N)``): the store and limits come
    from the environment the parent set, since each worker builds its own app."""
    if os.environ.get("EDGECL_SERVER_PARENT_PID"):
        _die_with_parent(int(os.environ["EDGECL_SERVER_PARENT_PID"]))
    connlimits.LIMITS.header_timeout_s = float(os.environ.get("EDGECL_SERVER_HEADER_TIMEOUT_S", "10"))
    connlimits.LIMITS.max_connections_per_client = int(os.environ.get("EDGECL_SERVER_MAX_CONN_PER_CLIENT", "64"))
    connlimits.LIMITS.max_connections = int(os.environ.get("EDGECL_SERVER_MAX_CONNECTIONS", "1024"))
    store = Store(os.environ["EDGECL_SERVER_STORE"], os.environ.get("EDGECL_SERVER_DB") or None,
                  os.environ.get("EDGECL_SERVER_BLOBS") or None, os.environ.get("EDGECL_RELEASE_KEY_FILE") or None)
    return create_app(store, int(os.environ.get("EDGECL_SERVER_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)),
                      float(os.environ.get("EDGECL_SERVER_BODY_IDLE_S", DEFAULT_BODY_IDLE_S)))


def serve(host: str = "127.0.0.1", port: int = 8750, db: str | None = None, store_dir: str = "~/.edgecl/server",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, log_level: str = "info",
          workers: int = 1, header_timeout_s: float = 10.0, body_idle_s: float = DEFAULT_BODY_IDLE_S,
          keep_alive_s: int = DEFAULT_KEEP_ALIVE_S, max_connections_per_client: int = 64,
          max_connections: int = 1024, blobs: str | None = None, release_key_file: str | None = None) -> None:
    """Run the server until interrupted (``edgecl server start``). ``workers`` > 1 runs that many API
    processes on the same port and store (each process is stateless; SQLite or PostgreSQL is shared).

    Limits: a request head must arrive within ``header_timeout_s``; a body may pause at most
    ``body_idle_s``; an idle keep-alive connection closes after ``keep_alive_s``; one client address
    may hold ``max_connections_per_client`` connections per process (0: no cap); a process holds at
    most ``max_connections`` connections, shedding the oldest one still waiting for a request head
    to admit a new one, and answers 503 only when every connection is serving a request (connlimits.py)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # creates the schema and the release key once, before any worker starts
    store = Store(store_dir, db, blobs, release_key_file)
    max_upload_bytes = int(max_upload_mb * (1 << 20))
    log.info("edgecl server on http://%s:%d (storage %s, blobs in %s, at %s, %d worker(s))", host, port,
             store.dialect, store.blobs.kind, store.root, workers)
    connlimits.LIMITS.header_timeout_s = header_timeout_s
    connlimits.LIMITS.max_connections_per_client = max_connections_per_client
    connlimits.LIMITS.max_connections = max_connections
    # access_log off: one line per push at 200+ pushes/s is noise; the app logs rejections itself.
    # h11_max_incomplete_event_size caps a request head at 64 kB when the h11 parser is used.
    options = dict(host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=keep_alive_s,
                   limit_concurrency=connlimits.uvicorn_limit_concurrency(max_connections),
                   h11_max_incomplete_event_size=64 << 10, http=connlimits.protocol_class())
    if workers <= 1:
        uvicorn.run(create_app(store, max_upload_bytes, body_idle_s), **options)
        return
    store.close()
    os.environ.update(EDGECL_SERVER_STORE=str(store.root), EDGECL_SERVER_DB=db or "", EDGECL_SERVER_BLOBS=store.blobs.kind,
                      EDGECL_RELEASE_KEY_FILE=release_key_file or os.environ.get("EDGECL_RELEASE_KEY_FILE", ""),
                      EDGECL_SERVER_MAX_UPLOAD_BYTES=str(max_upload_bytes), EDGECL_SERVER_PARENT_PID=str(os.getpid()),
                      EDGECL_SERVER_HEADER_TIMEOUT_S=str(header_timeout_s), EDGECL_SERVER_BODY_IDLE_S=str(body_idle_s),
                      EDGECL_SERVER_MAX_CONN_PER_CLIENT=str(max_connections_per_client),
                      EDGECL_SERVER_MAX_CONNECTIONS=str(max_connections))
    uvicorn.run("edgecl.server.app:create_app_from_env", factory=True, workers=workers, **options)
