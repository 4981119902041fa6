"""Deltas: devices push them; devices (their own and merged ones) and admins list and fetch them.

The push is streamed: the 8-byte prefix and the header are read first and checked (size cap,
device, bundle, hashes, K) before a byte of the body is read, so a wrong push costs the server a
few hundred bytes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from edgecl.formats import delta as D
from edgecl.server.routes.common import (
    AUTH,
    BodyReader,
    Version,
    auth,
    check_sha,
    content_length,
    limits_of,
    store_of,
)
from edgecl.server.service import Rejected, accept_delta, authenticate_push, check_header

log = logging.getLogger("edgecl.server")
router = APIRouter(dependencies=AUTH)


@router.post("/v1/deltas", status_code=201, responses={200: {"description": "already have it"}})
async def push_delta(request: Request) -> JSONResponse:
    """Body: the delta file's bytes (application/octet-stream). Header: Authorization: Bearer TOKEN."""
    store, limits = store_of(request), limits_of(request)
    device, canaries = await run_in_threadpool(authenticate_push, store, request.headers.get("authorization"))
    cap = limits.max_upload_bytes
    declared = content_length(request)
    if declared is not None and declared > cap:
        raise Rejected("too_large", 413, f"the upload is {declared} bytes, over the {cap}-byte cap",
                       "push a smaller delta (--values int8) or raise the server's --max-upload-mb")
    reader = BodyReader(request, cap, limits.body_idle_s)
    try:
        await reader.fill(8)
        n = D.header_size(bytes(reader.buf[:8]))
        await reader.fill(8 + n)
        header = D.read_header(bytes(reader.buf[: 8 + n]))
    except D.DeltaError as exc:
        raise Rejected.from_delta_error(exc) from exc
    cached = store.cached_bundle(header.bundle_id, header.bundle_version)
    if cached is not None:     # nothing to ask the database: checked here, without a trip to a thread
        bundle = check_header(store, header, device, cap, canaries, cached)
    else:
        bundle = await run_in_threadpool(check_header, store, header, device, cap, canaries)
    if declared is not None and declared != header.total_bytes:
        code = "truncated" if declared < header.total_bytes else "trailing_data"
        raise Rejected(code, 400, f"the upload is {declared} bytes, the delta's header says {header.total_bytes}",
                       "send the whole file, unchanged")
    await reader.fill(header.total_bytes + 1)     # +1: notice bytes past the end
    result = await run_in_threadpool(accept_delta, store, bytes(reader.buf), header, device, bundle)
    log.info("delta %s from %s: %s", result.sha256[:12], device.name, "stored" if result.new else "duplicate")
    return JSONResponse(result.to_json(), status_code=201 if result.new else 200)


@router.get("/v1/deltas")
async def list_deltas(request: Request, bundle_id: str | None = None, version: Version | None = None,
                      device: str | None = None) -> dict[str, Any]:
    """Admins see every delta; a device sees its own and the merged ones."""
    who = await auth(request)
    rows = await run_in_threadpool(store_of(request).list_deltas, bundle_id, version, device)
    if who.role != "admin":
        rows = [r for r in rows if r["device"] in (who.name, D.MERGE_DEVICE_ID)]
    return {"deltas": rows}


@router.get("/v1/deltas/{sha256}", response_class=Response)
async def get_delta(request: Request, sha256: str) -> Response:
    who = await auth(request)
    check_sha(sha256)
    store = store_of(request)
    row = await run_in_threadpool(store.delta_row, sha256)
    if row is None or (who.role != "admin" and row["device"] not in (who.name, D.MERGE_DEVICE_ID)):
        raise Rejected("not_found", 404, f"no delta {sha256}", "list the deltas you may see: GET /v1/deltas")
    data = await run_in_threadpool(store.get_blob, sha256)
    if data is None:
        raise Rejected("store_damaged", 500, f"delta {sha256} is listed but its file is missing",
                       "restore the store folder from backup")
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{sha256}.safetensors"'})


@router.get("/v1/overlaps/{sha256}", response_class=Response)
async def get_overlap(request: Request, sha256: str) -> Response:
    """Admin. The overlap counts file a merge wrote (per tensor NAME.indices / NAME.counts)."""
    await auth(request, admin=True)
    check_sha(sha256)
    data = await run_in_threadpool(store_of(request).get_blob, sha256)
    if data is None:
        raise Rejected("not_found", 404, f"no overlap file {sha256}", "use the overlap_sha256 a merge returned")
    return Response(data, media_type="application/octet-stream")
