"""Bundle files as content-addressed blobs: admins ask which are missing and upload only those."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edgecl.server.routes.common import (
    AUTH,
    auth,
    body_chunks,
    check_sha,
    content_length,
    json_body,
    limits_of,
    store_of,
)
from edgecl.server.service import Rejected
from edgecl.server.store import SHA_RE

router = APIRouter(dependencies=AUTH)


@router.post("/v1/blobs/missing")
async def missing_blobs(request: Request) -> dict[str, Any]:
    """Admin. {"sha256": [...]} -> the ones the server does not have (upload only those)."""
    await auth(request, admin=True)
    store = store_of(request)
    body = await json_body(request)
    wanted = body.get("sha256") if isinstance(body, dict) else None
    if not isinstance(wanted, list) or len(wanted) > 10_000 or not all(
            isinstance(s, str) and SHA_RE.fullmatch(s) for s in wanted):
        raise Rejected("bad_request", 400, "sha256 is not a list of sha256s", "send {\"sha256\": [...]}")
    have = await run_in_threadpool(lambda: {s for s in wanted if store.blob_ok(s)})
    return {"missing": [s for s in wanted if s not in have]}


@router.put("/v1/blobs/{sha256}", status_code=201)
async def put_blob(request: Request, sha256: str) -> JSONResponse:
    """Admin. Body: a bundle file's bytes; stored only if they hash to ``sha256``."""
    await auth(request, admin=True)
    check_sha(sha256)
    store, limits = store_of(request), limits_of(request)
    cap = limits.max_blob_bytes
    declared = content_length(request)
    if declared is not None and declared > cap:
        raise Rejected("too_large", 413, f"the file is {declared} bytes, over {cap}", "raise the server's --max-blob-mb")
    if await run_in_threadpool(store.blob_ok, sha256):
        return JSONResponse({"status": "already_have_it", "sha256": sha256}, status_code=200)
    tmp = store.blob_tmp_path()
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in body_chunks(request, limits.body_idle_s):
                size += len(chunk)
                if size > cap:
                    raise Rejected("too_large", 413, f"the file is over {cap} bytes", "raise the server's --max-blob-mb")
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
