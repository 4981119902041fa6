"""The client's side of a merge job: start it, wait for it (docs/server.md, "Merge").

Transport-free (stdlib only): the caller passes ``call(method, path) -> dict``, its own JSON API
call with its retry rules (edgecl/release.py passes the device/host HTTP client's ``api_json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgecl.errors import EdgeclError

Call = Callable[[str, str], dict[str, Any]]


def merge_and_wait(call: Call, bundle_id: str, version: int, query: str = "", timeout_s: float = 3600.0,
                   poll_s: float = 0.5, on_progress: Callable[[dict[str, Any]], None] | None = None,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Start a merge of ``bundle_id`` v``version`` (``query``: strategy, trim, exclusions, URL-encoded)
    and wait until it is done; its answer (sha256, overlap_sha256, devices, deltas, ...). A failed
    job raises EdgeclError with the server's code and message."""
    job = call("POST", f"/v1/bundles/{bundle_id}/{version}/merge" + (f"?{query}" if query else ""))
    deadline = clock() + timeout_s
    while job.get("state") not in ("done", "failed"):
        if clock() > deadline:
            raise EdgeclError(f"merge job {job.get('job_id')} did not finish in {timeout_s:g} s",
                              f"see GET {job.get('status_url')}, or wait longer")
        sleep(poll_s)
        job = call("GET", f"/v1/merge-jobs/{job['job_id']}")
        if on_progress is not None:
            on_progress(job)
    if job["state"] == "failed":
        error = job.get("error") or {}
        message = str(error.get("message", "unknown error"))
        problem, _, fix = message.partition(": ")
        raise EdgeclError(f"the server's merge failed ({error.get('error', '?')}): {problem}",
                          fix or "see the server log")
    return job
