"""Devices: their heartbeats, and the admin's list of them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from edgecl.server.drift import DRIFT_POINTS_PER_DEVICE, parse_drift
from edgecl.server.routes.common import AUTH, auth, check_name, check_version, json_body, store_of
from edgecl.server.service import Rejected

router = APIRouter(dependencies=AUTH)


@router.post("/v1/heartbeat")
async def heartbeat(request: Request) -> dict[str, str]:
    """Device. {"event": "upgraded"|"watch"|..., "bundle_id", "version", "drift": {...}}: the device is
    alive, at this version; ``drift`` (from `edgecl watch`) adds a point to its series (/v1/drift)."""
    who = await auth(request)
    body = await json_body(request)
    try:
        event = str(body.get("event", "heartbeat"))[:32]
        bundle_id = check_name(str(body["bundle_id"]), "bundle id") if body.get("bundle_id") else ""
        version = check_version(int(body["version"])) if body.get("version") else 0
        drift = body.get("drift")
    except (TypeError, ValueError, AttributeError) as exc:
        raise Rejected("bad_request", 400, f"the body is not a heartbeat ({exc})",
                       "send {\"event\", \"bundle_id\", \"version\"}") from exc
    store = store_of(request)
    if drift is None:
        await run_in_threadpool(store.touch_device, who.name, event, bundle_id, version)
    else:
        point = parse_drift(drift)      # checked before anything is written
        await run_in_threadpool(store.add_drift_report, who.name, event, bundle_id, version, point,
                                DRIFT_POINTS_PER_DEVICE)
    return {"status": "ok"}


@router.get("/v1/drift")
async def drift_series(request: Request, device: str | None = None,
                       last: Annotated[int | None, Query(ge=1, le=DRIFT_POINTS_PER_DEVICE)] = None) -> dict[str, Any]:
    """Admin. Each device's drift reports over time (oldest first, as columns); ``device``: one device's,
    ``last``: only the newest N points of each."""
    await auth(request, admin=True)
    store = store_of(request)
    if device is not None:
        check_name(device, "device")
        if not any(d["name"] == device for d in await run_in_threadpool(store.list_devices)):
            raise Rejected("not_found", 404, f"no device named {device!r}", "list them with GET /v1/devices")
    series = await run_in_threadpool(store.drift_series, device, last)
    return {"max_points_per_device": DRIFT_POINTS_PER_DEVICE, "devices": series}


@router.get("/v1/devices")
async def list_devices(request: Request) -> dict[str, Any]:
    """Admin. Every device: name, role, version, last seen, last held-out accuracy, revoked."""
    await auth(request, admin=True)
    return {"devices": await run_in_threadpool(store_of(request).list_devices)}
