"""The API's routers, one module per resource. Endpoints and error codes: docs/server.md."""

from edgecl.server.routes import blobs, bundles, dashboard, deltas, devices, docs, health, releases

ROUTERS = [health.router, deltas.router, bundles.router, blobs.router, releases.router, devices.router,
           dashboard.router, docs.router]
