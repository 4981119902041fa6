"""`edgecl watch`: complete files only, one JSON line per image, a new state picked up without a
restart, a bounded review queue that never stops serving, rotating logs, drift statistics."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edgecl.device.review import QueueLimits, ReviewQueue
from edgecl.device.watch import ReadyFiles, RotatingLog, Watcher, WatchOptions


def _png(path: Path, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_only_complete_files_are_taken_once(tmp_path: Path) -> None:
    files = ReadyFiles(tmp_path, settle_s=1.0)
    done = _png(tmp_path / "a.png")
    _age(done, 5)
    growing = tmp_path / "b.png"
    growing.write_bytes(b"\x89PNG half")
    _png(tmp_path / ".c.png")                       # hidden: a camera's temp name before its rename
    (tmp_path / "d.png.part").write_bytes(_png(tmp_path / "sub" / "d.png").read_bytes())
    (tmp_path / "notes.txt").write_text("x")
    assert files.scan()[0] == []                    # first sight: nothing is known to be stable yet
    growing.write_bytes(b"\x89PNG half and more")   # still being written
    ready, waiting = files.scan()
    assert ready == [done] and waiting == 1
    files.mark_done(done)
    _age(growing, 5)
    assert files.scan()[0] == []                    # its mtime changed: seen once more first
    assert files.scan()[0] == [growing]
    files.mark_done(growing)
    assert files.scan()[0] == []                    # served files are not served again
    _png(done, seed=3)
    _age(done, 5)
    files.scan()
    assert files.scan()[0] == [done]                # rewritten under the same name: served again
    done.unlink()
    files.scan()
    assert "a.png" not in files._done               # memory follows the folder


def test_log_rotates_and_keeps_n(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "watch.jsonl", max_bytes=200, keep=2)
    for i in range(30):
        log.write([{"i": i, "pad": "x" * 40}])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["watch.jsonl", "watch.jsonl.1", "watch.jsonl.2"]
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    last = [json.loads(line)["i"] for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert last[-1] == 29


def _camera(folder: Path, calib_dir: Path, n: int, cls: str = "class0", start: int = 0) -> list[Path]:
    """Copy n images as a camera would: write a hidden temp file, rename it into place."""
    out = []
    for i, src in enumerate(sorted((calib_dir / cls).iterdir())[start:start + n]):
        tmp = folder / f".{cls}-{start + i}.png"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / f"{cls}-{start + i}.png")
        out.append(folder / f"{cls}-{start + i}.png")
    return out


def test_watch_once_logs_every_image_and_queues_unsure_ones(bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    cam = tmp_path / "cam"
    cam.mkdir()
    _camera(cam, calib_dir, 3)
    _png(cam / "noise.png", 1)
    (cam / "broken.png").write_bytes(b"not an image")
    log = tmp_path / "log" / "watch.jsonl"
    opts = WatchOptions(settle_s=0.0, poll_s=0.01, low_confidence=1.01, batch_size=2)  # queue every answer
    report = Watcher(bundle_copy, cam, opts, log=log).run(once=True)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert report.images == 4 and report.unreadable == 1 and len(lines) == 5
    good = [x for x in lines if "error" not in x]
    for line in good:
        assert set(line) >= {"time", "file", "class", "probability", "unknown", "unknown_score", "head",
                             "bundle_version", "state", "queued"}
        assert line["state"] == "bundle" and line["bundle_version"] == 1 and line["queued"] is True
    assert [x["file"] for x in lines if "error" in x] == ["broken.png"]
    queue = ReviewQueue(bundle_copy / "review")
    assert len(queue.items()) == 4 and {i["reason"] for i in queue.items()} <= {"unknown", "low-confidence"}
    stats = json.loads((bundle_copy / "state" / "watch.json").read_text())
    assert stats["images_total"] == 4 and stats["window_images"] == 4 and stats["embedding_shift"] > 0
    # a second --once finds nothing new in the folder's current files... (a new process forgets: serves again)
    again = Watcher(bundle_copy, cam, opts, log=log).run(once=True)
    assert again.images == 4


def test_a_full_queue_or_a_full_disk_stops_queueing_never_serving(bundle_copy: Path, calib_dir: Path,
                                                                  tmp_path: Path) -> None:
    cam = tmp_path / "cam"
    cam.mkdir()
    _camera(cam, calib_dir, 4)
    opts = WatchOptions(settle_s=0.0, low_confidence=1.01, review=QueueLimits(max_images=2))
    report = Watcher(bundle_copy, cam, opts, log=tmp_path / "a.jsonl").run(once=True)
    assert report.images == 4 and report.queued == 2 and report.not_queued == 2
    free_mb = shutil.disk_usage(tmp_path).free // 1_000_000
    opts = WatchOptions(settle_s=0.0, low_confidence=1.01, review=QueueLimits(min_free_mb=free_mb + 10_000),
                        review_root=str(tmp_path / "other-review"))
    report = Watcher(bundle_copy, cam, opts, log=tmp_path / "b.jsonl").run(once=True)
    assert report.images == 4 and report.queued == 0 and report.not_queued == 4
    lines = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["queued"] is False and x["class"] for x in lines)


def test_watch_picks_up_a_new_state_without_restarting(bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    from edgecl.device.adapt import adapt
    from edgecl.device.plan import AdaptOptions
    from edgecl.device.state import rollback

    cam = tmp_path / "cam"
    cam.mkdir()
    watcher = Watcher(bundle_copy, cam, WatchOptions(settle_s=0.0), log=tmp_path / "w.jsonl")
    _camera(cam, calib_dir, 2)
    watcher.files.scan()
    assert watcher.step() == 2
    adapt(bundle_copy, calib_dir, AdaptOptions(epochs=0, progress=False))  # another process would do the same
    _camera(cam, calib_dir, 2, start=2)
    watcher.files.scan()
    assert watcher.step() == 2
    rollback(bundle_copy)
    _camera(cam, calib_dir, 2, start=4)
    watcher.files.scan()
    assert watcher.step() == 2
    states = [(json.loads(x)["state"], json.loads(x)["head"]) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert states == [("bundle", "ncm")] * 2 + [("gen-000001", "lda")] * 2 + [("bundle", "ncm")] * 2
    assert watcher.report.reloads == 2


def test_cli_watch_once(bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgecl.cli.main import app

    cam = tmp_path / "cam"
    cam.mkdir()
    _camera(cam, calib_dir, 2)
    out = CliRunner().invoke(app, ["watch", str(bundle_copy), str(cam), "--once", "--settle-s", "0",
                                   "--pass-classes", "class0, class2"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and all(x["class"] == "class0" for x in lines)
    assert all(x["pass"] is (not x["unknown"]) for x in lines)
    out = CliRunner().invoke(app, ["watch", str(bundle_copy), str(tmp_path / "nope"), "--once"])
    assert out.exit_code == 1 and "error:" in out.output


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "queue"])
def test_review_refuses_class_names_that_are_not_plain_folder_names(tmp_path: Path, bad: str) -> None:
    from edgecl.errors import DataError

    queue = ReviewQueue(tmp_path / "r")
    image = _png(tmp_path / "x.png")
    with pytest.raises(DataError):
        queue.label_file(image, bad)
    assert not (tmp_path / "r" / "labeled").exists() or not any((tmp_path / "r" / "labeled").iterdir())


def test_watch_sends_its_drift_statistics_in_a_heartbeat(bundle_copy: Path, calib_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real HTTP server on loopback records what the device sends (the fleet server's side, its
    history and the dashboard's chart: tests/test_dashboard_drift.py)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgecl.device.provision import DeviceConfig, save_device_config

    got: list[tuple[str, str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            got.append((self.path, self.headers.get("Authorization", ""), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "device.toml"
    save_device_config(DeviceConfig(server=f"http://127.0.0.1:{server.server_address[1]}", name="dev-1",
                                    token="tok", bundle=str(bundle_copy.resolve())), config)
    monkeypatch.setenv("EDGECL_DEVICE_CONFIG", str(config))
    cam = tmp_path / "cam"
    cam.mkdir()
    _camera(cam, calib_dir, 3, cls="class1")
    try:
        Watcher(bundle_copy, cam, WatchOptions(settle_s=0.0), log=tmp_path / "w.jsonl").run(once=True)
    finally:
        server.shutdown()
        server.server_close()
    assert got, "no heartbeat"
    path, auth, body = got[-1]
    assert path == "/v1/heartbeat" and auth == "Bearer tok" and body["event"] == "watch" and body["version"] == 1
    drift = body["drift"]
    assert drift["images_total"] == 3 and drift["state"] == "bundle" and 0 < drift["mean_confidence"] <= 1
    assert drift["unknown_rate"] is not None and drift["embedding_shift"] > 0


def test_drift_shift_grows_when_the_images_move_away_from_the_known_classes() -> None:
    import numpy as np

    from edgecl.device.drift import DriftMonitor
    from edgecl.device.infer import Scored
    from edgecl.formats.prototypes import Prototypes

    protos = Prototypes.empty(4)
    protos.upsert("a", np.array([1.0, 0, 0, 0]), 10)
    protos.upsert("b", np.array([0, 1.0, 0, 0]), 10)

    class _Serving:  # what the monitor reads of a ServingState
        lda = lda_means = None
        state = type("S", (), {"prototypes": protos})()

    def batch(z: np.ndarray, unknown: bool) -> Scored:
        n = len(z)
        return Scored(z, np.zeros((n, 2)), np.tile([0.9, 0.1], (n, 1)), np.zeros(n), np.full(n, unknown))

    monitor = DriftMonitor(window=4)
    rng = np.random.default_rng(0)
    monitor.add(batch(np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]] * 2) + rng.normal(0, 0.01, (4, 4)), False),
                _Serving())  # type: ignore[arg-type]
    near = monitor.stats()
    monitor.add(batch(np.tile([3.0, 3.0, 0, 0], (4, 1)), True), _Serving())  # type: ignore[arg-type]
    far = monitor.stats()
    assert near["embedding_shift"] < 0.1 < 2 < far["embedding_shift"]
    assert near["unknown_rate"] == 0.0 and far["unknown_rate"] == 1.0 and far["window_images"] == 4
    assert far["images_total"] == 8 and far["mean_confidence"] == pytest.approx(0.9)


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_a_running_watch_process_serves_adapt_s_new_state(bundle_copy: Path, calib_dir: Path, tmp_path: Path,
                                                          stop_signal: str) -> None:
    """The real thing: `edgecl watch` in its own process, images arriving, `edgecl adapt` committing in
    another process; the same watch answers with the new state, and Ctrl-C (or a service manager's
    SIGTERM) ends it cleanly. The process starts with SIGINT ignored, as a background job of a
    non-interactive shell does (where CI may run): watch stops on it all the same."""
    import signal
    import subprocess
    import sys

    cam = tmp_path / "cam"
    cam.mkdir()
    log = tmp_path / "watch.jsonl"
    cli = [sys.executable, "-m", "edgecl.cli.main"]
    # PYTHONFAULTHANDLER: should it ever not stop on Ctrl-C, SIGABRT makes it print every thread's stack.
    proc = subprocess.Popen([*cli, "watch", str(bundle_copy), str(cam), "--log", str(log), "--settle-s", "0",
                             "--poll-s", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def lines() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def wait_for(n: int) -> list[dict]:
        deadline = time.monotonic() + 120
        while len(lines()) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        return lines()

    served: list[dict] = []
    try:
        _camera(cam, calib_dir, 2)
        assert len(wait_for(2)) == 2
        adapted = subprocess.run([*cli, "adapt", str(bundle_copy), "--data", str(calib_dir), "--epochs", "0", "-q"],
                                 capture_output=True, text=True, timeout=300)
        assert adapted.returncode == 0, adapted.stderr
        _camera(cam, calib_dir, 2, start=2)
        served = wait_for(4)
    finally:
        proc.send_signal(getattr(signal, stop_signal))
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            raise AssertionError(f"watch did not stop within 60 s of {stop_signal} ({len(served)} lines served); its "
                                 f"threads:\n{err[-6000:]}") from None
    assert proc.returncode == 0, err
    assert [x["state"] for x in served] == ["bundle", "bundle", "gen-000001", "gen-000001"]
    assert "served 4 images" in err and "Traceback" not in err


def test_watch_follows_the_device_config_to_the_bundle_pull_installed(bundle_copy: Path, calib_dir: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecl.device.adapt import adapt
    from edgecl.device.plan import AdaptOptions
    from edgecl.device.provision import DeviceConfig, save_device_config, set_bundle

    pulled = tmp_path / "bundle.v2"
    shutil.copytree(bundle_copy, pulled)
    adapt(pulled, calib_dir, AdaptOptions(epochs=0, progress=False))  # its own state, so the switch shows
    config = tmp_path / "device.toml"
    save_device_config(DeviceConfig(bundle=str(bundle_copy.resolve())), config)
    monkeypatch.setenv("EDGECL_DEVICE_CONFIG", str(config))
    cam = tmp_path / "cam"
    cam.mkdir()
    watcher = Watcher(bundle_copy, cam, WatchOptions(settle_s=0.0, heartbeat_s=0), log=tmp_path / "w.jsonl")
    _camera(cam, calib_dir, 1)
    watcher.files.scan()
    assert watcher.step() == 1
    time.sleep(0.01)  # a distinct mtime for the rewritten config
    set_bundle(config, pulled)  # what `edgecl pull` does once the new version is in place
    _camera(cam, calib_dir, 1, start=1)
    watcher.files.scan()
    assert watcher.step() == 1
    states = [json.loads(x)["state"] for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert states == ["bundle", "gen-000001"] and watcher.follower.bundle_dir == pulled.resolve()
