"""Merges as background jobs: ``POST .../merge`` answers at once with a job id; the merge runs in a
thread of the API process that took it, and its state (queued, running with progress, done with
the result, failed with the error) lives in the database, so any replica answers ``GET
/v1/merge-jobs/{id}``. One merge at a time per process (each is bounded in memory: merge_stream.py);
more wait in its queue. A job whose process stopped (its heartbeat older than ``STALE_S``) reads
as failed: start it again (same inputs, same merged bytes).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgecl.server.service import MergePlan, Rejected, execute_merge
from edgecl.server.store import Store

log = logging.getLogger("edgecl.server")

STALE_S = 60.0            # a queued or running job not touched for this long: its process is gone
HEARTBEAT_S = 5.0         # how often a process touches the jobs it holds
PROGRESS_EVERY_S = 0.5    # progress is written at most this often
JOB_ID_LENGTH = 32        # hex digits


class MergeJobs:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgecl-merge")
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._finished: dict[str, threading.Event] = {}
        self._beat: threading.Thread | None = None

    def submit(self, plan: MergePlan) -> dict[str, Any]:
        job_id = secrets.token_hex(JOB_ID_LENGTH // 2)
        self.store.add_merge_job(job_id, plan.bundle_id, plan.version, plan.request.strategy, len(plan.rows))
        with self._lock:
            self._held.add(job_id)
            self._finished[job_id] = threading.Event()
            if self._beat is None or not self._beat.is_alive():
                self._beat = threading.Thread(target=self._heartbeat, name="edgecl-merge-heartbeat", daemon=True)
                self._beat.start()
        self._pool.submit(self._run, job_id, plan)
        log.info("merge job %s queued: %s v%d, %d deltas", job_id, plan.bundle_id, plan.version, len(plan.rows))
        return self.status(job_id)

    def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job's status once it finished in this process, or after ``timeout_s``."""
        event = self._finished.get(job_id)
        if event is not None:
            event.wait(timeout_s)
        return self.status(job_id)

    def status(self, job_id: str) -> dict[str, Any]:
        row = self.store.merge_job(job_id) if len(job_id) == JOB_ID_LENGTH else None
        if row is None:
            raise Rejected("not_found", 404, f"no merge job {job_id[:80]}", "use the job_id POST .../merge returned")
        if row["state"] in ("queued", "running") and time.time_ns() - row["updated_ns"] > STALE_S * 1e9:
            row["state"] = "failed"
            row["error"] = {"error": "merge_lost", "status": 500, "message": "the API process running this merge "
                            "stopped: start the merge again (same deltas, same result)"}
        job = {"job_id": row["job_id"], "state": row["state"], "phase": row["phase"], "done": row["done"],
               "total": row["total"], "bundle_id": row["bundle_id"], "version": row["version"],
               "strategy": row["strategy"], "status_url": f"/v1/merge-jobs/{row['job_id']}", "error": row["error"]}
        return {**job, **(row["result"] or {})}       # done: the merge's answer at the top level, as before jobs

    def _run(self, job_id: str, plan: MergePlan) -> None:
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == total:
                last[0] = now
                self.store.update_merge_job(job_id, "running", phase, done, total)

        try:
            self.store.update_merge_job(job_id, "running", "reading", 0, len(plan.rows))
            result = execute_merge(self.store, plan, progress)
            self.store.update_merge_job(job_id, "done", "done", 1, 1, result=result)
        except Rejected as exc:
            self.store.update_merge_job(job_id, "failed", "failed", 0, 0,
                                        error={"error": exc.code, "status": exc.status, "message": str(exc)})
        except Exception as exc:   # a bug: logged with its traceback; the job says so
            log.exception("merge job %s failed", job_id)
            self.store.update_merge_job(job_id, "failed", "failed", 0, 0, error={
                "error": "internal", "status": 500,
                "message": f"internal error ({type(exc).__name__}): the server log has the details; report it"})
        finally:
            with self._lock:
                self._held.discard(job_id)
                event = self._finished.pop(job_id, None)
            if event is not None:
                event.set()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                held = sorted(self._held)
            if held:
                try:
                    self.store.touch_merge_jobs(held)
                except Exception:  # noqa: BLE001 - a missed beat is retried; the job itself reports errors
                    log.warning("merge job heartbeat failed", exc_info=True)
