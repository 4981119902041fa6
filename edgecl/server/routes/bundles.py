"""Bundle versions: admins register them and merge their deltas; devices and admins list them
and download their files."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from edgecl.server.limits import BUNDLE_UPLOAD_FACTOR
from edgecl.server.routes.common import (
    AUTH,
    BodyReader,
    auth,
    check_name,
    check_version,
    content_length,
    limits_of,
    store_of,
)
from edgecl.server.service import (
    MergeRequest,
    Rejected,
    bundle_file_path,
    encoded_file,
    plan_merge,
    register_bundle_files,
    register_bundle_json,
    visible_bundles,
)

router = APIRouter(dependencies=AUTH)


@router.get("/v1/bundles")
async def list_bundles(request: Request) -> dict[str, Any]:
    """The registered bundle versions this caller may see (a canary version only its devices)."""
    who = await auth(request)
    bundles = await run_in_threadpool(visible_bundles, store_of(request), who)
    return {"bundles": [b.to_json() for b in bundles]}


@router.post("/v1/bundles", status_code=201)
async def add_bundle(request: Request) -> JSONResponse:
    """Admin. JSON body: {"files": {name: sha256}} (a whole bundle, uploaded first with PUT
    /v1/blobs/{sha256}), or {"manifest": <manifest.json object>, "mask_b64": <mask, base64>}
    (registered for pushes only)."""
    await auth(request, admin=True)
    store, limits = store_of(request), limits_of(request)
    declared = content_length(request)
    limit = limits.max_upload_bytes * BUNDLE_UPLOAD_FACTOR
    if declared is not None and declared > limit:
        raise Rejected("too_large", 413, f"the bundle upload is {declared} bytes, over {limit}",
                       "raise the server's --max-upload-mb")
    reader = BodyReader(request, limit, limits.body_idle_s)
    await reader.fill(limit + 1)
    try:
        body = json.loads(bytes(reader.buf))
        if isinstance(body, dict) and "files" in body:
            bundle, new = await run_in_threadpool(register_bundle_files, store, body["files"])
        else:
            manifest, mask_bytes = body["manifest"], base64.b64decode(body["mask_b64"], validate=True)
            bundle, new = await run_in_threadpool(register_bundle_json, store, manifest, mask_bytes)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise Rejected("bundle_invalid", 400, f"the body is not {{files}} or {{manifest, mask_b64}} JSON ({exc})",
                       "send the bundle's files as {name: sha256}, or the manifest and the base64 mask") from exc
    return JSONResponse({"status": "stored" if new else "already_have_it", "bundle": bundle.to_json()},
                        status_code=201 if new else 200)


@router.get("/v1/bundles/{bundle_id}/{version}/files/{name}")
async def get_bundle_file(request: Request, bundle_id: str, version: int, name: str,
                          encoding: str | None = None, from_sha256: str | None = None) -> FileResponse:
    """A file of a released bundle version (a device) or of any stored one (an admin).
    ``encoding=zlib`` and/or ``from_sha256=`` (a file the caller has): the answer's
    ``X-Edgecl-Encoding`` header says how it is encoded (identity, zlib, xor-zlib for a base of the
    same size, dict-zlib for one of another size)."""
    who = await auth(request)
    store = store_of(request)
    check_name(bundle_id, "bundle id")
    check_name(name, "file name")
    check_version(version)
    if encoding not in (None, "identity", "zlib"):
        raise Rejected("bad_request", 400, f"unknown encoding {encoding[:40]!r}", "use identity or zlib")
    if encoding is None and from_sha256 is None:
        path = await run_in_threadpool(bundle_file_path, store, who, bundle_id, version, name)
        return FileResponse(path, media_type="application/octet-stream")
    path, used = await run_in_threadpool(encoded_file, store, who, bundle_id, version, name, encoding, from_sha256)
    return FileResponse(path, media_type="application/octet-stream", headers={"X-Edgecl-Encoding": used})


@router.post("/v1/bundles/{bundle_id}/{version}/merge", status_code=202,
             responses={200: {"description": "done within wait_s: the merge's answer"}})
async def merge(request: Request, bundle_id: str, version: int,
                strategy: str = "weighted-mean", trim: Annotated[float | None, Query(ge=0, lt=0.5)] = None,
                max_share: Annotated[float | None, Query(gt=0, le=1)] = None,
                exclude_device: Annotated[list[str] | None, Query()] = None,
                exclude_delta: Annotated[list[str] | None, Query()] = None,
                wait_s: Annotated[float, Query(ge=0, le=600)] = 0) -> JSONResponse:
    """Admin. Start merging the bundle version's counted device deltas as a background job: 202 with
    ``job_id`` and ``status_url`` (GET it for progress and, when done, the merged delta's and overlap
    file's ids). Refusals known before it runs (unknown bundle, nothing to merge, unknown strategy)
    are answered at once. ``wait_s``: wait up to that long, and answer 200 with the result if done."""
    await auth(request, admin=True)
    check_version(version)
    store, jobs = store_of(request), request.app.state.merge_jobs
    merge_request = MergeRequest(strategy=strategy, trim=trim, max_share=max_share,
                                 exclude_devices=tuple(exclude_device or ()), exclude_deltas=tuple(exclude_delta or ()))
    plan = await run_in_threadpool(plan_merge, store, bundle_id, version, merge_request)
    job = await run_in_threadpool(jobs.submit, plan)
    if wait_s > 0:
        job = await run_in_threadpool(jobs.wait, job["job_id"], wait_s)
    if job["state"] == "failed":
        error = job["error"]
        raise Rejected(error["error"], int(error.get("status", 500)), *str(error["message"]).split(": ", 1))
    return JSONResponse(job, status_code=200 if job["state"] == "done" else 202,
                        headers={"Location": job["status_url"]})


@router.get("/v1/merge-jobs/{job_id}")
async def merge_job(request: Request, job_id: str) -> dict[str, Any]:
    """Admin. A merge job: state (queued, running, done, failed), phase and progress (done / total),
    and when done the merge's answer (sha256, overlap_sha256, inputs, devices, deltas...)."""
    await auth(request, admin=True)
    return await run_in_threadpool(request.app.state.merge_jobs.status, job_id)
