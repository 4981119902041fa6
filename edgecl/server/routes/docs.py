"""Interactive API docs at /docs, with Swagger UI's files from the swagger-ui-py wheel (no CDN)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from edgecl.server.service import Rejected

router = APIRouter(include_in_schema=False)
_ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}


@cache
def _swagger_static() -> Path | None:
    """Swagger UI's files from the swagger-ui-py wheel; found without importing it."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


@router.get("/docs", response_class=HTMLResponse)
async def docs() -> HTMLResponse:
    if _swagger_static() is None:
        return HTMLResponse("<!doctype html><title>edgecl API</title><p>The interactive docs need the "
                            "<code>swagger-ui-py</code> package (pip install 'edgecl[server]'). The API "
                            "description is at <a href='/openapi.json'>/openapi.json</a>.</p>")
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title="edgecl fleet server",
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon-32x32.png")


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    static = _swagger_static()
    if static is None or name not in _ASSETS:
        raise Rejected("not_found", 404, f"no docs asset {name[:80]}", "open /docs")
    return FileResponse(static / name)
