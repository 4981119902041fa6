"""The HTTP API (FastAPI on uvicorn). Endpoints and error codes: docs/server.md.

The upload is streamed: the 8-byte prefix and the header are read first and checked (size cap,
device, bundle, hashes, K) before a byte of the body is read, so a wrong push costs the server a
few hundred bytes. Blocking work (database, hashing, fsync) runs in the thread pool, never on the
event loop. Every error, including a bug's 500 and an unknown route, is one JSON object
``{"error": CODE, "message": "problem: fix"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgecl import __version__
from edgecl.formats import delta as D
from edgecl.server import protocol
from edgecl.server.service import (
    MergeRequest,
    Rejected,
    accept_delta,
    authenticate,
    bundle_file_path,
    check_header,
    dashboard,
    encoded_file,
    latest_release,
    register_bundle_files,
    register_bundle_json,
    release_version,
    run_merge,
    visible,
)
from edgecl.server.store import MAX_DB_INT, SHA_RE, Store

log = logging.getLogger("edgecl.server")

DEFAULT_MAX_UPLOAD_BYTES = 16 << 20    # a dense fp32 delta of a 5% EfficientNet-Lite0 mask is ~1 MB
DEFAULT_MAX_BLOB_BYTES = 1 << 30       # one bundle file (PUT /v1/blobs): the largest ONNX graph of a bundle
BUNDLE_UPLOAD_FACTOR = 8               # a bundle upload (mask as base64 JSON) may be this many times larger
DEFAULT_BODY_IDLE_S = 30.0             # longest wait for the next chunk of a request body
MIN_BODY_RATE_BPS = 1024               # after the first body_idle_s, a body must average at least this
DEFAULT_KEEP_ALIVE_S = 5               # an idle keep-alive connection is closed after this
_JSON_LIMIT = 1 << 20                  # JSON bodies (releases, heartbeats, blob lists)

_bearer = HTTPBearer(auto_error=False, description="The device's or admin's token (edgecl server device add)")
_AUTH = [Security(_bearer)]            # documents the scheme in OpenAPI so /docs can send the token
Version = Annotated[int, Query(ge=1, le=MAX_DB_INT)]


def _swagger_static() -> Path | None:
    """Swagger UI's files from the swagger-ui-py wheel (no CDN); found without importing it."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


def create_app(store: Store, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               body_idle_s: float = DEFAULT_BODY_IDLE_S, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> FastAPI:
    app = FastAPI(title="edgecl fleet server", version=__version__, docs_url=None, redoc_url=None,
                  description="Devices push deltas (docs/delta-format.md) and pull signed bundle versions; "
                              "ops merge, release and watch them (docs/server.md).")

    def _error(code: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)

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

    async def _auth(request: Request, admin: bool = False):  # noqa: ANN202
        return await run_in_threadpool(authenticate, store, request.headers.get("authorization"), admin)

    def _sha(value: str) -> str:
        # Ids in URLs are sha256s only: nothing a client sends ever becomes a path.
        if not SHA_RE.fullmatch(value):
            raise Rejected("bad_id", 400, f"{value[:80]!r} is not a sha256", "use the 64-hex-digit id from the list")
        return value

    def _name(value: str, what: str) -> str:
        if not D.NAME_RE.fullmatch(value):
            raise Rejected("bad_id", 400, f"{what} {value[:80]!r} is not a name", "use the names the API lists")
        return value

    async def _json_body(request: Request) -> Any:
        reader = _BodyReader(request, _JSON_LIMIT, body_idle_s)
        await reader.fill(_JSON_LIMIT + 1)
        try:
            return json.loads(bytes(reader.buf))
        except ValueError as exc:
            raise Rejected("bad_request", 400, f"the body is not JSON ({exc})", "send a JSON object") from exc

    @app.get("/health")
    async def health() -> dict[str, Any]:
        count = await run_in_threadpool(store.count_deltas)
        return {"status": "ok", "version": __version__, "storage": store.dialect, "deltas": count,
                "max_upload_bytes": max_upload_bytes}

    @app.get("/v1/server-key")
    async def server_key() -> dict[str, str]:
        """The public key releases are signed with. Pin it from `edgecl server key` on the server
        itself: fetched over the network it is only as trustworthy as the network."""
        return {"public_key": await run_in_threadpool(store.release_public_key), "algorithm": "ed25519"}

    @app.post("/v1/deltas", status_code=201, responses={200: {"description": "already have it"}},
              dependencies=_AUTH)
    async def push_delta(request: Request) -> JSONResponse:
        """Body: the delta file's bytes (application/octet-stream). Header: Authorization: Bearer TOKEN."""
        device = await _auth(request)
        declared = _content_length(request)
        if declared is not None and declared > max_upload_bytes:
            raise Rejected("too_large", 413, f"the upload is {declared} bytes, over the {max_upload_bytes}-byte cap",
                           "push a smaller delta (--values int8) or raise the server's --max-upload-mb")
        reader = _BodyReader(request, max_upload_bytes, body_idle_s)
        try:
            await reader.fill(8)
            n = D.header_size(bytes(reader.buf[:8]))
            await reader.fill(8 + n)
            header = D.read_header(bytes(reader.buf[: 8 + n]))
        except D.DeltaError as exc:
            raise Rejected.from_delta_error(exc) from exc
        bundle = await run_in_threadpool(check_header, store, header, device, max_upload_bytes)
        if declared is not None and declared != header.total_bytes:
            code = "truncated" if declared < header.total_bytes else "trailing_data"
            raise Rejected(code, 400, f"the upload is {declared} bytes, the delta's header says {header.total_bytes}",
                           "send the whole file, unchanged")
        await reader.fill(header.total_bytes + 1)     # +1: notice bytes past the end
        result = await run_in_threadpool(accept_delta, store, bytes(reader.buf), header, device, bundle)
        log.info("delta %s from %s: %s", result.sha256[:12], device.name, "stored" if result.new else "duplicate")
        return JSONResponse(result.to_json(), status_code=201 if result.new else 200)

    @app.get("/v1/deltas", dependencies=_AUTH)
    async def list_deltas(request: Request, bundle_id: str | None = None, version: Version | None = None,
                          device: str | None = None) -> dict[str, Any]:
        """Admins see every delta; a device sees its own and the merged ones."""
        who = await _auth(request)
        rows = await run_in_threadpool(store.list_deltas, bundle_id, version, device)
        if who.role != "admin":
            rows = [r for r in rows if r["device"] in (who.name, D.MERGE_DEVICE_ID)]
        return {"deltas": rows}

    @app.get("/v1/deltas/{sha256}", response_class=Response, dependencies=_AUTH)
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

    @app.get("/v1/bundles", dependencies=_AUTH)
    async def list_bundles(request: Request) -> dict[str, Any]:
        await _auth(request)
        bundles = await run_in_threadpool(store.list_bundles)
        return {"bundles": [b.to_json() for b in bundles]}

    @app.post("/v1/bundles", status_code=201, dependencies=_AUTH)
    async def add_bundle(request: Request) -> JSONResponse:
        """Admin. JSON body: {"files": {name: sha256}} (a whole bundle, uploaded first with PUT
        /v1/blobs/{sha256}), or {"manifest": <manifest.json object>, "mask_b64": <mask, base64>}
        (registered for pushes only)."""
        await _auth(request, admin=True)
        declared = _content_length(request)
        limit = max_upload_bytes * BUNDLE_UPLOAD_FACTOR
        if declared is not None and declared > limit:
            raise Rejected("too_large", 413, f"the bundle upload is {declared} bytes, over {limit}",
                           "raise the server's --max-upload-mb")
        reader = _BodyReader(request, limit, body_idle_s)
        await reader.fill(limit + 1)
        try:
            body = json.loads(bytes(reader.buf))
            if isinstance(body, dict) and "files" in body:
                bundle, new = await run_in_threadpool(register_bundle_files, store, body["files"])
            else:
                manifest, mask_bytes = body["manifest"], base64.b64decode(body["mask_b64"], validate=True)
                bundle, new = await run_in_threadpool(register_bundle_json, store, manifest, mask_bytes)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise Rejected("bundle_invalid", 400, f"the body is not {{files}} or {{manifest, mask_b64}} JSON ({exc})",
                           "send the bundle's files as {name: sha256}, or the manifest and the base64 mask") from exc
        return JSONResponse({"status": "stored" if new else "already_have_it", "bundle": bundle.to_json()},
                            status_code=201 if new else 200)

    @app.post("/v1/blobs/missing", dependencies=_AUTH)
    async def missing_blobs(request: Request) -> dict[str, Any]:
        """Admin. {"sha256": [...]} -> the ones the server does not have (upload only those)."""
        await _auth(request, admin=True)
        body = await _json_body(request)
        wanted = body.get("sha256") if isinstance(body, dict) else None
        if not isinstance(wanted, list) or len(wanted) > 10_000 or not all(
                isinstance(s, str) and SHA_RE.fullmatch(s) for s in wanted):
            raise Rejected("bad_request", 400, "sha256 is not a list of sha256s", "send {\"sha256\": [...]}")
        have = await run_in_threadpool(lambda: {s for s in wanted if store.blob_ok(s)})
        return {"missing": [s for s in wanted if s not in have]}

    @app.put("/v1/blobs/{sha256}", status_code=201, dependencies=_AUTH)
    async def put_blob(request: Request, sha256: str) -> JSONResponse:
        """Admin. Body: a bundle file's bytes; stored only if they hash to ``sha256``."""
        await _auth(request, admin=True)
        _sha(sha256)
        declared = _content_length(request)
        if declared is not None and declared > max_blob_bytes:
            raise Rejected("too_large", 413, f"the file is {declared} bytes, over {max_blob_bytes}",
                           "raise the server's --max-blob-mb")
        if await run_in_threadpool(store.blob_ok, sha256):
            return JSONResponse({"status": "already_have_it", "sha256": sha256}, status_code=200)
        tmp = store.blob_tmp_path()
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in _chunks(request, body_idle_s):
                    size += len(chunk)
                    if size > max_blob_bytes:
                        raise Rejected("too_large", 413, f"the file is over {max_blob_bytes} bytes",
                                       "raise the server's --max-blob-mb")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                await run_in_threadpool(os.fsync, f.fileno())
            if digest.hexdigest() != sha256:
                raise Rejected("body_hash_mismatch", 400, f"the bytes hash to {digest.hexdigest()}, not {sha256}",
                               "upload the file again, unchanged")
            await run_in_threadpool(store.adopt_blob, tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse({"status": "stored", "sha256": sha256, "size_bytes": size}, status_code=201)

    @app.get("/v1/bundles/{bundle_id}/{version}/files/{name}", dependencies=_AUTH)
    async def get_bundle_file(request: Request, bundle_id: str, version: int, name: str,
                              encoding: str | None = None, from_sha256: str | None = None) -> FileResponse:
        """A file of a released bundle version (a device) or of any stored one (an admin).
        ``encoding=zlib`` and/or ``from_sha256=`` (a file the caller has, same size): the answer's
        ``X-Edgecl-Encoding`` header says how it is encoded (identity, zlib, xor-zlib)."""
        who = await _auth(request)
        _name(bundle_id, "bundle id")
        _name(name, "file name")
        _version(version)
        if encoding not in (None, "identity", "zlib"):
            raise Rejected("bad_request", 400, f"unknown encoding {encoding[:40]!r}", "use identity or zlib")
        if encoding is None and from_sha256 is None:
            path = await run_in_threadpool(bundle_file_path, store, who, bundle_id, version, name)
            return FileResponse(path, media_type="application/octet-stream")
        path, used = await run_in_threadpool(encoded_file, store, who, bundle_id, version, name, encoding, from_sha256)
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Edgecl-Encoding": used})

    @app.post("/v1/bundles/{bundle_id}/{version}/merge", dependencies=_AUTH)
    async def merge(request: Request, bundle_id: str, version: int,
                    strategy: str = "weighted-mean", trim: Annotated[float | None, Query(ge=0, lt=0.5)] = None,
                    max_share: Annotated[float | None, Query(gt=0, le=1)] = None,
                    exclude_device: Annotated[list[str] | None, Query()] = None,
                    exclude_delta: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
        """Admin. Merge the bundle version's counted device deltas; returns the merged delta's and overlap file's ids."""
        await _auth(request, admin=True)
        _version(version)
        request_ = MergeRequest(strategy=strategy, trim=trim, max_share=max_share,
                                exclude_devices=tuple(exclude_device or ()), exclude_deltas=tuple(exclude_delta or ()))
        return await run_in_threadpool(run_merge, store, bundle_id, version, request_)

    @app.get("/v1/overlaps/{sha256}", response_class=Response, dependencies=_AUTH)
    async def get_overlap(request: Request, sha256: str) -> Response:
        """Admin. The overlap counts file a merge wrote (per tensor NAME.indices / NAME.counts)."""
        await _auth(request, admin=True)
        _sha(sha256)
        data = await run_in_threadpool(store.get_blob, sha256)
        if data is None:
            raise Rejected("not_found", 404, f"no overlap file {sha256}", "use the overlap_sha256 a merge returned")
        return Response(data, media_type="application/octet-stream")

    @app.post("/v1/releases", status_code=201, dependencies=_AUTH)
    async def release(request: Request) -> JSONResponse:
        """Admin. {"bundle_id", "version", "canary": [device names], "report": {...}}: sign a stored
        version's manifest and make it pullable (only by the canary devices when named)."""
        await _auth(request, admin=True)
        body = await _json_body(request)
        try:
            bundle_id, version = _name(str(body["bundle_id"]), "bundle id"), _version(int(body["version"]))
            canary, report = list(body.get("canary") or []), dict(body.get("report") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise Rejected("bad_request", 400, f"the body is not a release request ({exc})",
                           "send {\"bundle_id\", \"version\", \"canary\": [], \"report\": {}}") from exc
        result = await run_in_threadpool(release_version, store, bundle_id, version, canary, report)
        return JSONResponse(result, status_code=201 if result["status"] == "released" else 200)

    @app.post("/v1/releases/{bundle_id}/{version}/promote", dependencies=_AUTH)
    async def promote(request: Request, bundle_id: str, version: int) -> dict[str, Any]:
        """Admin. A canary release becomes a release for every device."""
        await _auth(request, admin=True)
        _version(version)
        try:
            await run_in_threadpool(store.promote_release, bundle_id, version)
        except Exception as exc:
            raise Rejected("not_found", 404, str(exc), "release it first") from exc
        return {"status": "promoted", "bundle_id": bundle_id, "version": version}

    @app.get("/v1/releases", dependencies=_AUTH)
    async def list_releases(request: Request, bundle_id: str | None = None) -> dict[str, Any]:
        who = await _auth(request)
        rows = await run_in_threadpool(store.list_releases, bundle_id)
        return {"releases": [{k: r[k] for k in ("bundle_id", "version", "manifest_sha256", "canary", "released_utc")}
                             for r in rows if visible(r, who)]}

    @app.get("/v1/releases/latest", dependencies=_AUTH)
    async def latest(request: Request, bundle_id: str) -> dict[str, Any]:
        """The newest release this device may pull: version, signature, public key, files (name ->
        sha256, size). Also the device's heartbeat."""
        who = await _auth(request)
        _name(bundle_id, "bundle id")
        return await run_in_threadpool(latest_release, store, who, bundle_id)

    @app.post("/v1/heartbeat", dependencies=_AUTH)
    async def heartbeat(request: Request) -> dict[str, str]:
        """Device. {"event": "upgraded"|..., "bundle_id", "version"}: the device is alive, at this version."""
        who = await _auth(request)
        body = await _json_body(request)
        try:
            event = str(body.get("event", "heartbeat"))[:32]
            bundle_id = _name(str(body["bundle_id"]), "bundle id") if body.get("bundle_id") else ""
            version = _version(int(body["version"])) if body.get("version") else 0
        except (TypeError, ValueError, AttributeError) as exc:
            raise Rejected("bad_request", 400, f"the body is not a heartbeat ({exc})",
                           "send {\"event\", \"bundle_id\", \"version\"}") from exc
        await run_in_threadpool(store.touch_device, who.name, event, bundle_id, version)
        return {"status": "ok"}

    @app.get("/v1/devices", dependencies=_AUTH)
    async def list_devices(request: Request) -> dict[str, Any]:
        """Admin. Every device: name, role, version, last seen, last held-out accuracy, revoked."""
        await _auth(request, admin=True)
        return {"devices": await run_in_threadpool(store.list_devices)}

    @app.get("/v1/dashboard", dependencies=_AUTH)
    async def dashboard_data(request: Request) -> dict[str, Any]:
        """Admin. What /dashboard shows."""
        await _auth(request, admin=True)
        return await run_in_threadpool(dashboard, store)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        from edgecl.server.dashboard import PAGE

        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                           "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; img-src 'self' data:"})

    static = _swagger_static()

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        if static is None:
            return HTMLResponse("<!doctype html><title>edgecl API</title><p>The interactive docs need the "
                                "<code>swagger-ui-py</code> package (pip install 'edgecl[server]'). The API "
                                "description is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="edgecl fleet server",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        allowed = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}
        if static is None or name not in allowed:
            raise Rejected("not_found", 404, f"no docs asset {name[:80]}", "open /docs")
        return FileResponse(static / name)

    return app


def _version(value: int) -> int:
    if not 1 <= value <= MAX_DB_INT:
        raise Rejected("bad_request", 422, f"version {value} is out of range [1, {MAX_DB_INT}]", "pass a real version")
    return value


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise Rejected("bad_request", 400, "Content-Length is not a number", "send a valid HTTP request")
    return int(value)


async def _chunks(request: Request, idle_s: float):  # noqa: ANN201 - async iterator of bytes
    """The request body, chunk by chunk; 408 when the client sends nothing for ``idle_s``, or
    trickles it (under MIN_BODY_RATE_BPS on average once ``idle_s`` has passed: a byte every few
    seconds would otherwise hold a connection for days)."""
    stream = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise Rejected("timeout", 408, f"no request body bytes for {idle_s:g} s",
                           "send the body without pausing (check the network)") from None
        received += len(chunk)
        elapsed = loop.time() - started
        if elapsed > idle_s and received < MIN_BODY_RATE_BPS * elapsed:
            raise Rejected("timeout", 408, f"the body arrives at {received / elapsed:.0f} B/s, under "
                           f"{MIN_BODY_RATE_BPS} B/s", "send the body at network speed (check the network)")
        yield chunk


class _BodyReader:
    """Reads the request body incrementally, never holding more than ``limit`` bytes."""

    def __init__(self, request: Request, limit: int, idle_s: float = DEFAULT_BODY_IDLE_S) -> None:
        self.buf = bytearray()
        self._stream = _chunks(request, idle_s).__aiter__()
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
    protocol.LIMITS.header_timeout_s = float(os.environ.get("EDGECL_SERVER_HEADER_TIMEOUT_S", "10"))
    protocol.LIMITS.max_connections_per_client = int(os.environ.get("EDGECL_SERVER_MAX_CONN_PER_CLIENT", "64"))
    store = Store(os.environ["EDGECL_SERVER_STORE"], os.environ.get("EDGECL_SERVER_DB") or None)
    return create_app(store, int(os.environ.get("EDGECL_SERVER_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)),
                      float(os.environ.get("EDGECL_SERVER_BODY_IDLE_S", DEFAULT_BODY_IDLE_S)))


def serve(host: str = "127.0.0.1", port: int = 8750, db: str | None = None, store_dir: str = "~/.edgecl/server",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / (1 << 20), log_level: str = "info",
          workers: int = 1, header_timeout_s: float = 10.0, body_idle_s: float = DEFAULT_BODY_IDLE_S,
          keep_alive_s: int = DEFAULT_KEEP_ALIVE_S, max_connections_per_client: int = 64,
          max_connections: int = 1024) -> None:
    """Run the server until interrupted (``edgecl server start``). ``workers`` > 1 runs that many API
    processes on the same port and store (each process is stateless; SQLite or PostgreSQL is shared).

    Limits: a request head must arrive within ``header_timeout_s``; a body may pause at most
    ``body_idle_s``; an idle keep-alive connection closes after ``keep_alive_s``; one client address
    may hold ``max_connections_per_client`` connections per process (0: no cap); past
    ``max_connections`` connections or requests in flight a process answers 503 (uvicorn's
    limit_concurrency)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(store_dir, db)         # creates the schema and the release key once, before any worker starts
    max_upload_bytes = int(max_upload_mb * (1 << 20))
    log.info("edgecl server on http://%s:%d (storage %s at %s, %d worker(s))", host, port, store.dialect,
             store.root, workers)
    protocol.LIMITS.header_timeout_s = header_timeout_s
    protocol.LIMITS.max_connections_per_client = max_connections_per_client
    # access_log off: one line per push at 200+ pushes/s is noise; the app logs rejections itself.
    # h11_max_incomplete_event_size caps a request head at 64 kB when the h11 parser is used.
    options = dict(host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=keep_alive_s,
                   limit_concurrency=max_connections, h11_max_incomplete_event_size=64 << 10,
                   http=protocol.protocol_class())
    if workers <= 1:
        uvicorn.run(create_app(store, max_upload_bytes, body_idle_s), **options)
        return
    store.close()
    os.environ.update(EDGECL_SERVER_STORE=str(store.root), EDGECL_SERVER_DB=db or "",
                      EDGECL_SERVER_MAX_UPLOAD_BYTES=str(max_upload_bytes), EDGECL_SERVER_PARENT_PID=str(os.getpid()),
                      EDGECL_SERVER_HEADER_TIMEOUT_S=str(header_timeout_s), EDGECL_SERVER_BODY_IDLE_S=str(body_idle_s),
                      EDGECL_SERVER_MAX_CONN_PER_CLIENT=str(max_connections_per_client))
    uvicorn.run("edgecl.server.app:create_app_from_env", factory=True, workers=workers, **options)
