"""The read-only dashboard: its page (anyone) and its data (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from edgecl.server.routes.common import AUTH, auth, store_of
from edgecl.server.service import dashboard

router = APIRouter()


@router.get("/v1/dashboard", dependencies=AUTH)
async def dashboard_data(request: Request) -> dict[str, Any]:
    """Admin. What /dashboard shows."""
    await auth(request, admin=True)
    return await run_in_threadpool(dashboard, store_of(request))


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    from edgecl.server.dashboard import PAGE

    return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                       "default-src 'self'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; img-src 'self' data:"})
