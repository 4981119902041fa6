"""The HTTP API (FastAPI on uvicorn). Endpoints and error codes: docs/server.md.

The upload is streamed: the 8-byte prefix and the header are read first and checked (size cap,
device, bundle, hashes, K) before a byte of the body is read, so a wrong push costs the server a
few hundred bytes. Blocking work (database, hashing, fsync) runs in the thread pool, never on the
event loop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from edgecl import __version__
from edgecl.formats import delta as D
from edgecl.server.service import (
    Rejected,
    accept_delta,
    authenticate,
    check_header,
    register_bundle_json,
    run_merge,
)
from edgecl.server.store import SHA_RE, Store

log = logging.getLogger("edgecl.server")

DEFAULT_MAX_UPLOAD_BYTES = 16 << 20    # a dense fp32 delta of a 5% EfficientNet-Lite0 mask is ~1 MB
BUNDLE_UPLOAD_FACTOR = 8               # a bundle upload (mask as base64 JSON) may be this many times larger


def create_app(store: Store, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="edgecl fleet server", version=__version__,
                  description="Devices push deltas (docs/delta-format.md); ops merge them into new bundle versions.")

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        log.warning("%s %s rejected: %s %s", request.method, request.url.path, exc.code, exc)
        return JSONResponse(exc.to_json(), status_code=exc.status)

    async def _auth(request: Request, admin: bool = False):  # noqa: ANN202
        return await run_in_threadpool(authenticate, store, request.headers.get("authorization"), admin)

    def _sha(value: str) -> str:
        # Ids in URLs are sha256s only: nothing a client sends ever becomes a path.
        if not SHA_RE.fullmatch(value):
            raise Rejected("bad_id", 400, f"{value[:80]!r} is not a sha256", "use the 64-hex-digit id from the list")
        return value

    @app.get("/health")
    async def health() -> dict[str, Any]:
        count = await run_in_threadpool(store.count_deltas)
        return {"status": "ok", "version": __version__, "storage": store.dialect, "deltas": count,
                "max_upload_bytes": max_upload_bytes}

    @app.post("/v1/deltas", status_code=201, responses={200: {"description": "already have it"}})
    async def push_delta(request: Request) -> JSONResponse:
        """Body: the delta file's bytes (application/octet-stream). Header: Authorization: Bearer TOKEN."""
        device = await _auth(request)
        declared = _content_length(request)
        if declared is not None and declared > max_upload_bytes:
            raise Rejected("too_large", 413, f"the upload is {declared} bytes, over the {max_upload_bytes}-byte cap",
                           "push a smaller delta (--values int8) or raise the server's --max-upload-mb")
        reader = _BodyReader(request, max_upload_bytes)
        try:
            await reader.fill(8)
            n = D.header_size(bytes(reader.buf[:8]))
            await reader.fill(8 + n)
            header = D.read_header(bytes(reader.buf[: 8 + n]))
        except D.DeltaError as exc:
            raise Rejected.from_delta_error(exc) from exc
        await run_in_threadpool(check_header, store, header, device, max_upload_bytes)
        if declared is not None and declared != header.total_bytes:
            code = "truncated" if declared < header.total_bytes else "trailing_data"
            raise Rejected(code, 400, f"the upload is {declared} bytes, the delta's header says {header.total_bytes}",
                           "send the whole file, unchanged")
        await reader.fill(header.total_bytes + 1)     # +1: notice bytes past the end
        result = await run_in_threadpool(accept_delta, store, bytes(reader.buf), header, device)
        log.info("delta %s from %s: %s", result.sha256[:12], device.name, "stored" if result.new else "duplicate")
        return JSONResponse(result.to_json(), status_code=201 if result.new else 200)

    @app.get("/v1/deltas")
    async def list_deltas(request: Request, bundle_id: str | None = None, version: int | None = None,
                          device: str | None = None) -> dict[str, Any]:
        """Admins see every delta; a device sees its own and the merged ones."""
        who = await _auth(request)
        rows = await run_in_threadpool(store.list_deltas, bundle_id, version, device)
        if who.role != "admin":
            rows = [r for r in rows if r["device"] in (who.name, D.MERGE_DEVICE_ID)]
        return {"deltas": rows}

    @app.get("/v1/deltas/{sha256}", response_class=Response)
    async def get_delta(request: Request, sha256: str) -> Response:
        who = await _auth(request)
        _sha(sha256)
        row = await run_in_threadpool(store.delta_row, sha256)
        if row is None or (who.role != "admin" and row["device"] not in (who.name, D.MERGE_DEVICE_ID)):
            raise Rejected("not_found", 404, f"no delta {sha256}", "list the deltas you may see: GET /v1/deltas")
        data = await run_in_threadpool(store.get_blob, sha256)
        if data is None:
            raise Rejected("store_damaged", 500, f"delta {sha256} is listed but its file is missing",
                           "restore the store folder from backup")
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sha256}.safetensors"'})

    @app.get("/v1/bundles")
    async def list_bundles(request: Request) -> dict[str, Any]:
        await _auth(request)
        bundles = await run_in_threadpool(store.list_bundles)
        return {"bundles": [b.to_json() for b in bundles]}

    @app.post("/v1/bundles", status_code=201)
    async def add_bundle(request: Request) -> JSONResponse:
        """Admin. JSON body: {"manifest": <manifest.json object>, "mask_b64": <mask.safetensors, base64>}."""
        await _auth(request, admin=True)
        declared = _content_length(request)
        limit = max_upload_bytes * BUNDLE_UPLOAD_FACTOR
        if declared is not None and declared > limit:
            raise Rejected("too_large", 413, f"the bundle upload is {declared} bytes, over {limit}",
                           "raise the server's --max-upload-mb")
        reader = _BodyReader(request, limit)
        await reader.fill(limit + 1)
        try:
            import json

            body = json.loads(bytes(reader.buf))
            manifest, mask_bytes = body["manifest"], base64.b64decode(body["mask_b64"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise Rejected("bundle_invalid", 400, f"the body is not {{manifest, mask_b64}} JSON ({exc})",
                           "send the manifest.json object and the base64 of mask.safetensors") from exc
        bundle, new = await run_in_threadpool(register_bundle_json, store, manifest, mask_bytes)
        return JSONResponse({"status": "stored" if new else "already_have_it", "bundle": bundle.to_json()},
                            status_code=201 if new else 200)

    @app.post("/v1/bundles/{bundle_id}/{version}/merge")
    async def merge(request: Request, bundle_id: str, version: int,
                    strategy: str = Query("weighted-mean")) -> dict[str, Any]:
        """Admin. Merge the bundle version's device deltas; returns the merged delta's and overlap file's ids."""
        await _auth(request, admin=True)
        return await run_in_threadpool(run_merge, store, bundle_id, version, strategy)

    @app.get("/v1/overlaps/{sha256}", response_class=Response)
    async def get_overlap(request: Request, sha256: str) -> Response:
        """Admin. The overlap counts file a merge wrote (per tensor NAME.indices / NAME.counts)."""
        await _auth(request, admin=True)
        _sha(sha256)
        data = await run_in_threadpool(store.get_blob, sha256)
        if data is None:
            raise Rejected("not_found", 404, f"no overlap file {sha256}", "use the overlap_sha256 a merge returned")
        return Response(data, media_type="application/octet-stream")

    return app


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise Rejected("bad_request", 400, "Content-Length is not a number", "send a valid HTTP request")
    return int(value)


class _BodyReader:
    """Reads the request body incrementally, never holding more than ``limit`` bytes."""

    def __init__(self, request: Request, limit: int) -> None:
        self.buf = bytearray()
        self._stream = request.stream().__aiter__()
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


def create_app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes (``serve(workers=N)``): the store and limits come
    from the environment the parent set, since each worker builds its own app."""
    store = Store(os.environ["EDGECL_SERVER_STORE"], os.environ.get("EDGECL_SERVER_DB") or None)
    return create_app(store, int(os.environ.get("EDGECL_SERVER_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)))


def serve(host: str = "127.0.0.1", port: int = 8750, db: str | None = None, store_dir: str = "~/.edgecl/server",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / (1 << 20), log_level: str = "info",
          workers: int = 1) -> None:
    """Run the server until interrupted (``edgecl serve``). ``workers`` > 1 runs that many API
    processes on the same port and store (each process is stateless; SQLite or PostgreSQL is shared)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(store_dir, db)         # creates the schema once, before any worker starts
    max_upload_bytes = int(max_upload_mb * (1 << 20))
    log.info("edgecl serve on http://%s:%d (storage %s at %s, %d worker(s))", host, port, store.dialect,
             store.root, workers)
    # access_log off: one line per push at 200+ pushes/s is noise; the app logs rejections itself.
    if workers <= 1:
        uvicorn.run(create_app(store, max_upload_bytes), host=host, port=port, log_level=log_level, access_log=False)
        return
    store.close()
    os.environ.update(EDGECL_SERVER_STORE=str(store.root), EDGECL_SERVER_DB=db or "",
                      EDGECL_SERVER_MAX_UPLOAD_BYTES=str(max_upload_bytes))
    uvicorn.run("edgecl.server.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False)
