"""Anyone: is the server up, and which key signs its releases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from edgecl import __version__
from edgecl.server.routes.common import limits_of, store_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    store = store_of(request)
    count = await run_in_threadpool(store.count_deltas)
    return {"status": "ok", "version": __version__, "storage": store.dialect, "blobs": store.blobs.kind,
            "deltas": count,
            "max_upload_bytes": limits_of(request).max_upload_bytes}


@router.get("/v1/server-key")
async def server_key(request: Request) -> dict[str, str]:
    """The public key releases are signed with. Pin it from `edgecl server key` on the server
    itself: fetched over the network it is only as trustworthy as the network."""
    return {"public_key": await run_in_threadpool(store_of(request).release_public_key), "algorithm": "ed25519"}
