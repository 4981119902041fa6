"""Devices: their heartbeats, and the admin's list of them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from edgecl.server.routes.common import AUTH, auth, check_name, check_version, json_body, store_of
from edgecl.server.service import Rejected

router = APIRouter(dependencies=AUTH)


@router.post("/v1/heartbeat")
async def heartbeat(request: Request) -> dict[str, str]:
    """Device. {"event": "upgraded"|..., "bundle_id", "version"}: the device is alive, at this version."""
    who = await auth(request)
    body = await json_body(request)
    try:
        event = str(body.get("event", "heartbeat"))[:32]
        bundle_id = check_name(str(body["bundle_id"]), "bundle id") if body.get("bundle_id") else ""
        version = check_version(int(body["version"])) if body.get("version") else 0
    except (TypeError, ValueError, AttributeError) as exc:
        raise Rejected("bad_request", 400, f"the body is not a heartbeat ({exc})",
                       "send {\"event\", \"bundle_id\", \"version\"}") from exc
    await run_in_threadpool(store_of(request).touch_device, who.name, event, bundle_id, version)
    return {"status": "ok"}


@router.get("/v1/devices")
async def list_devices(request: Request) -> dict[str, Any]:
    """Admin. Every device: name, role, version, last seen, last held-out accuracy, revoked."""
    await auth(request, admin=True)
    return {"devices": await run_in_threadpool(store_of(request).list_devices)}
