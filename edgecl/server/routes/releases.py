"""Releases: admins sign a stored version and open it (to canary devices, then to all); devices
find the newest one they may pull."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edgecl.server.routes.common import AUTH, auth, check_name, check_version, json_body, store_of
from edgecl.server.service import Rejected, latest_release, release_version, visible

router = APIRouter(dependencies=AUTH)


@router.post("/v1/releases", status_code=201)
async def release(request: Request) -> JSONResponse:
    """Admin. {"bundle_id", "version", "canary": [device names], "report": {...}}: sign a stored
    version's manifest and make it pullable (only by the canary devices when named)."""
    await auth(request, admin=True)
    body = await json_body(request)
    try:
        bundle_id, version = check_name(str(body["bundle_id"]), "bundle id"), check_version(int(body["version"]))
        canary, report = list(body.get("canary") or []), dict(body.get("report") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise Rejected("bad_request", 400, f"the body is not a release request ({exc})",
                       "send {\"bundle_id\", \"version\", \"canary\": [], \"report\": {}}") from exc
    result = await run_in_threadpool(release_version, store_of(request), bundle_id, version, canary, report)
    return JSONResponse(result, status_code=201 if result["status"] == "released" else 200)


@router.post("/v1/releases/{bundle_id}/{version}/promote")
async def promote(request: Request, bundle_id: str, version: int) -> dict[str, Any]:
    """Admin. A canary release becomes a release for every device."""
    await auth(request, admin=True)
    check_version(version)
    try:
        await run_in_threadpool(store_of(request).promote_release, bundle_id, version)
    except Exception as exc:
        raise Rejected("not_found", 404, str(exc), "release it first") from exc
    return {"status": "promoted", "bundle_id": bundle_id, "version": version}


@router.get("/v1/releases")
async def list_releases(request: Request, bundle_id: str | None = None) -> dict[str, Any]:
    who = await auth(request)
    rows = await run_in_threadpool(store_of(request).list_releases, bundle_id)
    return {"releases": [{k: r[k] for k in ("bundle_id", "version", "manifest_sha256", "canary", "released_utc")}
                         for r in rows if visible(r, who)]}


@router.get("/v1/releases/latest")
async def latest(request: Request, bundle_id: str) -> dict[str, Any]:
    """The newest release this device may pull: version, signature, public key, files (name ->
    sha256, size). Also the device's heartbeat."""
    who = await auth(request)
    check_name(bundle_id, "bundle id")
    return await run_in_threadpool(latest_release, store_of(request), who, bundle_id)
