"""`edgecl watch BUNDLE DIR`: serve the device's current state on the images a camera writes into DIR.

One loop, all numpy + onnxruntime:

1. scan DIR (``ReadyFiles``): a file is taken once it is complete: its size and mtime unchanged
   since the previous scan and at least ``settle_s`` old (a camera that writes in place), or renamed
   into place (hidden ``.name`` and ``*.tmp`` / ``*.part`` files are never taken). Files are
   remembered by (size, mtime) only while they are in DIR, so memory is bounded by DIR's listing;
2. decode up to ``batch_size`` of them and classify them in one inference call with the state
   ``StateFollower`` holds: it re-reads ``state/HEAD.json`` before every batch and loads a new
   committed generation (adapt, rollback, upgrade) without a restart; with a device config whose
   ``bundle`` names this bundle, it follows `edgecl pull` to the new folder too. A half-written
   state is never read (the generation is complete before HEAD is renamed over), and a state that
   fails to load leaves the last good one serving;
3. append one JSON line per image to the log (``RotatingLog``; stdout without ``--log``): time,
   file, class, probability, unknown, unknown_score, head, bundle version, state generation;
4. queue unknown and low-confidence images for review (``review.ReviewQueue``: bounded, and it
   stops taking images when the disk is nearly full; serving goes on);
5. update the drift statistics (``drift.DriftMonitor``) and save them in the state folder.

``--once`` processes what DIR holds (waiting for files still being written) and exits.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import numpy as np
from threadpoolctl import threadpool_limits

from edgecl.errors import DataError, EdgeclError
from edgecl.formats.config import DeviceProfile
from edgecl.formats.images import IMAGE_SUFFIXES, load_input
from edgecl.formats.preprocess import Preprocess

from .drift import DriftMonitor
from .infer import ServingState, create_runner, describe, need_prototypes, resolve_profile, warm_runner
from .review import QueueLimits, ReviewQueue, review_dir
from .state import HEAD, OpenBundle, load_current, open_bundle, read_head

_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))  # one encoder, not one per line


@dataclass
class WatchOptions:
    batch_size: int = 16                 # images per inference call
    poll_s: float = 0.5                  # pause between scans of DIR when nothing is ready
    settle_s: float = 1.0                # a file in place for this long with the same size and mtime is complete
    head: str | Enum = "auto"            # auto | ncm | lda
    low_confidence: float = 0.5          # queue known-class answers below this probability for review
    log_max_mb: float = 10.0             # rotate the JSON-lines log at this size
    log_keep: int = 5                    # rotated logs kept: LOG.1 .. LOG.N
    review: QueueLimits = field(default_factory=QueueLimits)
    review_root: str | None = None       # default BUNDLE/review
    queue: bool = True                   # queue unknown / low-confidence images at all
    follow_config: bool = True           # follow `edgecl pull` through the device config
    drift_window: int = 500              # images in the drift statistics' rolling window
    stats_every_s: float = 10.0          # write the drift statistics at most this often
    heartbeat_s: float = 300.0           # with a device config: send the drift statistics this often (0 = never)
    pass_classes: tuple[str, ...] = ()   # for a line's PLC: "pass" = answered one of these and not unknown
    prefetch: bool | None = None         # decode the next batch while this one runs; None: when 2+ cores may run


# -- 1. complete files ----------------------------------------------------------------------------

class ReadyFiles:
    """Which files of ``folder`` are complete and not yet served."""

    def __init__(self, folder: Path, settle_s: float) -> None:
        self.folder = folder
        self.settle_s = settle_s
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at the previous scan
        self._done: dict[str, tuple[int, int]] = {}  # served, while still in the folder

    def scan(self, now: float | None = None) -> tuple[list[Path], int]:
        """(complete files not yet served, oldest first; files still settling)."""
        now = time.time() if now is None else now
        ready: list[tuple[int, str]] = []
        seen: dict[str, tuple[int, int]] = {}
        waiting = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError as exc:
            raise DataError(f"{self.folder} does not exist", "create it, or pass the folder the camera writes to") from exc
        for entry in entries:
            name = entry.name
            lower = name.lower()
            # str checks, not Path objects: a backlog of thousands of files is scanned per batch otherwise
            if name.startswith(".") or lower.endswith(_PARTIAL_SUFFIXES) or os.path.splitext(lower)[1] not in IMAGE_SUFFIXES:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            key = (st.st_size, st.st_mtime_ns)
            seen[name] = key
            if self._done.get(name) == key:
                continue
            if self._seen.get(name) == key and now - st.st_mtime_ns / 1e9 >= self.settle_s and st.st_size > 0:
                ready.append((st.st_mtime_ns, name))
            else:
                waiting += 1
        self._seen = seen
        self._done = {n: k for n, k in self._done.items() if seen.get(n) == k}  # bounded by the folder
        return [self.folder / n for _, n in sorted(ready)], waiting

    def mark_done(self, path: Path) -> None:
        key = self._seen.get(path.name)
        if key is not None:
            self._done[path.name] = key


# -- 2. the current state -------------------------------------------------------------------------

class StateFollower:
    """The committed state to serve, reloaded when HEAD.json (or the config's bundle) changes."""

    def __init__(self, bundle_dir: Path, profile: str | Path | DeviceProfile | None, head: str | Enum,
                 follow_config: bool = True, batch: int | None = None) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self._profile_arg, self._head, self._batch = profile, head, batch
        self._config = _config_path_following(self.bundle_dir) if follow_config else None
        self._config_key: tuple[int, int] | None = None
        self._head_key: tuple[int, int, int] | None = None
        self.bundle: OpenBundle = open_bundle(self.bundle_dir)
        self.profile: DeviceProfile = resolve_profile(profile, self.bundle)
        self.runner = create_runner(self.bundle, self.profile, batch, spin=False)
        state = load_current(self.bundle)
        need_prototypes(state.prototypes, self.bundle)
        self.serving: ServingState = ServingState.create(self.bundle, state, head)
        self._head_key = self._head_stat()
        # Build the inference sessions now (blank images): the first camera image is then answered as
        # fast as the rest (B8's p99 otherwise holds the ~0.15 s session builds).
        warm_runner(self.runner, self.bundle, self.serving.state.delta)
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def generation(self) -> str:
        return self.serving.state.generation or "bundle"

    def _head_stat(self) -> tuple[int, int, int] | None:
        try:
            st = (self.bundle.state_dir / HEAD).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Reload if a new state was committed; True when the state served changed."""
        moved = self._follow_config()
        key = self._head_stat()
        if not moved and key == self._head_key:
            return False
        try:
            serving = ServingState.create(self.bundle, load_current(self.bundle), self._head)
        except (EdgeclError, OSError) as exc:  # e.g. garbage collection racing us: retry on the next batch
            self.last_error = getattr(exc, "problem", str(exc))
            return False
        self._head_key = key
        changed = serving.state.generation != self.serving.state.generation or moved
        self.serving = serving
        self.reloads += 1
        self.last_error = None
        return changed

    def _follow_config(self) -> bool:
        """After `edgecl pull` the device config names the new bundle folder: serve that one."""
        if self._config is None:
            return False
        try:
            st = self._config.stat()
        except FileNotFoundError:
            return False
        key = (st.st_mtime_ns, st.st_size)
        if key == self._config_key:
            return False
        self._config_key = key
        from .provision import load_device_config
        try:
            cfg = load_device_config(self._config)
        except EdgeclError:
            return False
        if cfg is None or not cfg.bundle or Path(cfg.bundle).resolve() == self.bundle_dir:
            return False
        try:
            bundle = open_bundle(cfg.bundle)
        except EdgeclError as exc:
            self.last_error = exc.problem
            return False
        self.bundle_dir, self.bundle = Path(cfg.bundle).resolve(), bundle
        self.profile = resolve_profile(self._profile_arg, bundle)
        self.runner = create_runner(bundle, self.profile, self._batch, spin=False)
        self._head_key = None
        return True


def _config_path_following(bundle_dir: Path) -> Path | None:
    """The device config, when it names this bundle (so a pull's switch is this device's)."""
    from .provision import config_path, load_device_config
    path = config_path()
    try:
        cfg = load_device_config(path)
    except EdgeclError:
        return None
    if cfg is None or not cfg.bundle or Path(cfg.bundle).resolve() != bundle_dir:
        return None
    return path


# -- 3. the log -----------------------------------------------------------------------------------

class RotatingLog:
    """JSON lines appended to ``path`` (or a stream), rotated at ``max_bytes`` into path.1 .. path.keep.

    A write that fails for lack of space is dropped (counted in ``dropped``): serving goes on."""

    def __init__(self, path: Path | None, max_bytes: int, keep: int, stream: IO[str] | None = None) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, max(keep, 1)
        self.stream = stream or sys.stdout
        self.dropped = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(_JSON.encode(r) + "\n" for r in rows)
        if self.path is None:
            self.stream.write(text)
            self.stream.flush()
            return
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(text) > self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.dropped += len(rows)

    def _rotate(self) -> None:
        assert self.path is not None
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


# -- the loop -------------------------------------------------------------------------------------

@dataclass
class WatchReport:
    images: int = 0
    unreadable: int = 0
    queued: int = 0
    not_queued: int = 0                  # unknown / unsure images the queue had no room for
    reloads: int = 0                     # states picked up
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # per image: its batch's time (last 10,000)


class Watcher:
    def __init__(self, bundle_dir: str | Path, folder: str | Path, options: WatchOptions | None = None,
                 profile: str | Path | DeviceProfile | None = None, log: str | Path | None = None,
                 stream: IO[str] | None = None) -> None:
        self.options = opts = options or WatchOptions()
        if opts.batch_size < 1:
            raise DataError(f"--batch-size {opts.batch_size} is less than 1", "pass 1 or more")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder} is not a folder", "pass the folder the camera writes images into")
        self.follower = StateFollower(Path(bundle_dir), profile, opts.head, opts.follow_config, opts.batch_size)
        self.files = ReadyFiles(self.folder, opts.settle_s)
        self.log = RotatingLog(Path(log) if log else None, int(opts.log_max_mb * 1_000_000), opts.log_keep, stream)
        self.queue = ReviewQueue(review_dir(bundle_dir, opts.review_root), opts.review)
        self.drift = DriftMonitor.load(self.follower.bundle.state_dir, opts.drift_window)
        self.report = WatchReport()
        self._stats_written = 0.0
        self._heartbeat_sent = 0.0
        self._heartbeat: Any = None  # the thread sending the last one
        self.heartbeats: list[dict[str, Any]] = []  # what was sent (the last 10), for the report and tests
        self.on_batch: Callable[[list[dict[str, Any]]], None] | None = None  # tests hook in
        self.policy: AdaptPolicy | None = None  # --adapt-when
        self._backlog: list[Path] = []  # complete files found by the last scan, not served yet
        self._inputs: list[np.ndarray] = []  # two sets of the model's input rows, used in turn (_input_rows)
        self._turn = 0
        self._prefetch: ThreadPoolExecutor | None = None  # the thread decoding the next batch
        self._pending: tuple[list[Path], Preprocess, Future[_Decoded]] | None = None
        if opts.prefetch or (opts.prefetch is None and _cores() > 1 and self.follower.profile.threads != 1):
            self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="watch-decode")

    def step(self) -> int:
        """One scan and at most one batch; the number of images served."""
        if self.follower.refresh():
            self.report.reloads += 1
            self.drift.reset_reference()
        if not self._backlog:  # a folder holding many complete files is scanned once, not once per batch
            self._backlog, _ = self.files.scan()
        batch, self._backlog = self._backlog[: self.options.batch_size], self._backlog[self.options.batch_size:]
        if not batch:
            return 0
        self.serve(batch)
        return len(batch)

    def serve(self, paths: list[Path]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        follower = self.follower
        m = follower.bundle.manifest
        preprocess = Preprocess.of(m)
        pending, self._pending = self._pending, None
        decoded = pending[2].result() if pending is not None else None  # always waited for: its rows get reused
        if decoded is None or pending is None or pending[0] != paths or pending[1] != preprocess:
            decoded = _decode(paths, preprocess, self._input_rows(len(paths), preprocess.input_size))
        if self._prefetch is not None and self._backlog:
            # The next batch is decoded (Python + Pillow, under the GIL) while onnxruntime runs this one
            # (which releases it): on 2+ cores the decoding costs no serving time.
            upcoming = self._backlog[: self.options.batch_size]
            buffer = self._input_rows(len(upcoming), preprocess.input_size)
            self._pending = (upcoming, preprocess, self._prefetch.submit(_decode, upcoming, preprocess, buffer))
        out: list[dict[str, Any]] = []
        for path, problem in decoded.errors:
            out.append({"time": _utc(), "file": path.name, "error": problem})
            self.report.unreadable += 1
            self.files.mark_done(path)
        rows = decoded.rows
        serving = follower.serving
        if rows:
            scored = serving.classify_input(follower.runner, decoded.images)
            now = _utc()  # the batch's answers are ready at once
            for i, (path, (name, probability, unknown, unknown_score)) in enumerate(
                    zip(rows, serving.top1(scored), strict=True)):
                line = {"time": now, "file": path.name, "class": name, "probability": probability,
                        "unknown": unknown, "unknown_score": unknown_score, "head": serving.head,
                        "bundle_version": m.version, "state": serving.state.generation or "bundle"}
                if self.options.pass_classes:
                    line["pass"] = name in self.options.pass_classes and not unknown
                reason = self._queue_reason(unknown, probability)
                if reason is not None:
                    item = self.queue.add(path, describe(serving, scored, i, top_k=3), reason)
                    line["queued"] = item is not None
                    self.report.queued += item is not None
                    self.report.not_queued += item is None
                out.append(line)
                self.files.mark_done(path)
            self.drift.add(scored, serving)
        self.log.write(out)
        done = time.perf_counter()
        self.report.images += len(rows)
        self.report.seconds += done - started  # serving time: a prefetch overlaps the previous batch's
        if rows:  # an image's answer waits for its whole batch (decode, inference, log line)
            self.report.latencies_ms.extend([1000.0 * (done - decoded.started)] * len(rows))
            del self.report.latencies_ms[:-10_000]  # bounded: the last 10,000 images
        self._save_stats()
        if self.on_batch is not None:
            self.on_batch(out)
        return out

    def _input_rows(self, n: int, size: tuple[int, int]) -> np.ndarray:
        """float32 [>= n, 3, H, W]: two sets reused in turn (one being decoded into while onnxruntime
        reads the other; onnxruntime is done with its set when run returns)."""
        shape = (max(n, self.options.batch_size), 3, *size)
        self._turn = 1 - self._turn
        while len(self._inputs) < 2:
            self._inputs.append(np.empty(shape, np.float32))
        if self._inputs[self._turn].shape != shape:
            self._inputs[self._turn] = np.empty(shape, np.float32)
        return self._inputs[self._turn]

    def close(self) -> None:
        """Wait for a running prefetch and stop its thread."""
        if self._pending is not None:
            self._pending[2].exception()  # wait; its outcome no longer matters
            self._pending = None
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True)
            self._prefetch = None

    def _queue_reason(self, unknown: bool | None, p: float | None) -> str | None:
        if not self.options.queue:
            return None
        if unknown:
            return "unknown"
        if p is None or p < self.options.low_confidence:
            return "low-confidence"
        return None

    def _save_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_written < self.options.stats_every_s:
            return
        self._stats_written = now
        try:
            self.drift.save(self.follower.bundle.state_dir, self.follower)
        except (OSError, EdgeclError):
            pass  # the statistics are a report, never a reason to stop serving
        self._send_heartbeat(force)

    def _send_heartbeat(self, force: bool = False) -> None:
        """The drift statistics to the fleet server, in a thread: the network never holds up serving."""
        config = self.follower._config
        now = time.monotonic()
        if config is None or self.options.heartbeat_s <= 0 or (self._heartbeat is not None and self._heartbeat.is_alive()):
            return
        if not force and now - self._heartbeat_sent < self.options.heartbeat_s:
            return
        from .provision import load_device_config
        try:
            cfg = load_device_config(config)
        except EdgeclError:
            return
        if cfg is None or not cfg.server or not cfg.token:
            return
        self._heartbeat_sent = now
        m = self.follower.bundle.manifest
        body = {"event": "watch", "bundle_id": m.bundle_id, "version": m.version,
                "drift": {**self.drift.stats(), "state": self.follower.generation}}

        def send() -> None:
            from edgecl.http_client import RetryPolicy, api_json
            try:
                api_json(cfg.server, cfg.token, "POST", "/v1/heartbeat", body, policy=RetryPolicy(retries=0, timeout_s=10))
                self.heartbeats = [*self.heartbeats[-9:], body]
            except EdgeclError:
                pass  # unreachable: the next one carries the newer figures

        import threading
        self._heartbeat = threading.Thread(target=send, daemon=True)
        self._heartbeat.start()

    def run(self, once: bool = False, stop: Callable[[], bool] | None = None) -> WatchReport:
        """Serve until ``stop()`` (or KeyboardInterrupt); with ``once``, until DIR holds nothing new.

        numpy's BLAS runs on one thread meanwhile: onnxruntime's pool owns the cores, and the per-batch
        products (the LDA scores, the unknown score's quadratic form: 16 x 1280 by 1280 x 64 and
        smaller) gain nothing from more. OpenBLAS's own threads, left at one per core, busy-wait
        after each product against onnxruntime's and the decoding thread (B8, 2 threads, an LDA
        state: 108-154 images/s with them, 505-888 without)."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run(once, stop)

    def _run(self, once: bool, stop: Callable[[], bool] | None) -> WatchReport:
        try:
            while stop is None or not stop():
                if self.policy is not None:
                    self.policy.poll()
                served = self.step()
                if served:
                    continue
                if once:
                    ready, waiting = self.files.scan()
                    if not ready and not waiting:
                        break
                time.sleep(self.options.poll_s)
            if once and self.policy is not None:
                self.policy.poll()
                self.policy.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()
            self._save_stats(force=True)
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=15)
        return self.report


def watch(bundle_dir: str | Path, folder: str | Path, once: bool = False, log: str | Path | None = None,
          options: WatchOptions | None = None, profile: str | Path | DeviceProfile | None = None) -> WatchReport:
    return Watcher(bundle_dir, folder, options, profile, log).run(once=once)


def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50_ms": None, "p99_ms": None}
    a = np.asarray(latencies_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


@dataclass
class _Decoded:
    """A batch decoded into the model's input rows (``images``: rows of the files that decoded)."""
    images: np.ndarray
    rows: list[Path]
    errors: list[tuple[Path, str]]  # unreadable files still in the folder, with the problem
    started: float                  # perf_counter when decoding began: the batch's latency counts from here


def _decode(paths: list[Path], preprocess: Preprocess, images: np.ndarray) -> _Decoded:
    """Decode ``paths`` into ``images`` [>= len(paths), 3, H, W]; touches nothing else (runs in the prefetch thread)."""
    started = time.perf_counter()
    rows: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for path in paths:
        try:
            load_input(path, preprocess, images[len(rows)])
            rows.append(path)
        except DataError as exc:
            if path.exists():  # else removed since the scan (the camera's own cleanup): nothing to answer
                errors.append((path, exc.problem))
    return _Decoded(images[: len(rows)], rows, errors, started)


def _cores() -> int:
    """The cores this process may run on (taskset / cgroup affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _utc() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


__all__ = ["ReadyFiles", "RotatingLog", "StateFollower", "WatchOptions", "WatchReport", "Watcher", "watch"]



# -- the policy: adapt on the operator's labels while serving ------------------------------------

class AdaptPolicy:
    """``--adapt-when N``: once the review's labeled folder holds N images, move them aside and run
    `edgecl adapt BUNDLE --data THEM`, then (with a device config) `edgecl delta` and `edgecl push`
    (which keeps the delta in the outbox when the server is unreachable), in a child process while
    watch keeps serving the last committed state. adapt takes the state lock and commits by
    renaming HEAD; the follower picks the new state up before its next batch. Images an adapt
    committed go to ``review/trained/``; after a failed one they go back to ``labeled/``."""

    def __init__(self, watcher: Watcher, threshold: int, extra_args: list[str] | None = None) -> None:
        self.watcher, self.threshold = watcher, threshold
        self.extra_args = list(extra_args or [])
        self.process: Any = None
        self.runs: list[dict[str, Any]] = []
        self._taken: Path | None = None
        self._generation_before: str | None = None
        self._started = 0.0

    def poll(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                return
            self._finish()
        if self.threshold > 0 and self.watcher.queue.labeled_count() >= self.threshold:
            self._start()

    def _start(self) -> None:
        import shlex
        import subprocess
        taken = self.watcher.queue.take_labeled()
        if taken is None:
            return
        bundle = str(self.watcher.follower.bundle_dir)
        cli = [sys.executable, "-m", "edgecl.cli.main"]
        steps = [cli + ["adapt", bundle, "--data", str(taken), "-q", *self.extra_args]]
        if self.watcher.follower._config is not None:
            delta_file = taken.with_name(f".delta-{time.time_ns():x}.safetensors")
            steps += [cli + ["delta", bundle, "--out", str(delta_file)], cli + ["push", str(delta_file)]]
        self._taken = taken
        self._generation_before = read_head(self.watcher.follower.bundle.state_dir).get("current")
        self._started = time.monotonic()
        script = " && ".join(shlex.join(step) for step in steps)
        self.process = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)

    def _finish(self) -> None:
        process, self.process = self.process, None
        output = process.stdout.read() if process.stdout else ""
        committed = read_head(self.watcher.follower.bundle.state_dir).get("current")
        run = {"ok": process.returncode == 0, "returncode": process.returncode,
               "seconds": time.monotonic() - self._started, "state": committed,
               "committed": committed != self._generation_before, "output": output[-2000:]}
        self.runs.append(run)
        assert self._taken is not None
        if run["committed"]:  # trained on (a failed push leaves its delta in the outbox: no reason to retrain)
            self.watcher.queue.trained(self._taken)
        else:
            self.watcher.queue.give_back(self._taken)
        self._taken = None
        print(json.dumps({"time": _utc(), "event": "adapt", **{k: v for k, v in run.items() if k != "output"}}),
              file=sys.stderr, flush=True)

    def wait(self, timeout_s: float = 600.0) -> None:
        if self.process is not None:
            self.process.wait(timeout=timeout_s)
            self._finish()
