"""The device's push client (edgecl.device.push) against a real server: sent / already there / rejected / unreachable,
bounded retries with backoff, the outbox, and the CLI's exit codes."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_server import ServerProcess, free_port, make_fleet
from typer.testing import CliRunner

from edgecl.device import push
from edgecl.formats import delta as D
from edgecl.http_client import RetryPolicy

FAST = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.02, timeout_s=5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    fleet = make_fleet(root / "store", n_devices=2)
    server = ServerProcess(root / "store").start()
    yield fleet, server
    server.stop()
    fleet.store.close()


def _write(fleet, tmp_path, seed, device="dev-0", name=None):
    path = tmp_path / (name or f"delta-{seed}.safetensors")
    D.save_file(make_delta(fleet.manifest, device, seed), path, fleet.devices[device][1])
    return path


def test_sent_then_already_there(env, tmp_path):
    fleet, server = env
    token = fleet.devices["dev-0"][0]
    path = _write(fleet, tmp_path, 1)
    first = push.push_files([path], server.url, token, tmp_path / "outbox", FAST)
    assert [r.status for r in first] == ["sent"] and push.exit_code(first) == 0
    assert first[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    again = push.push_files([path], server.url, token, tmp_path / "outbox", FAST)
    assert [r.status for r in again] == ["already_have_it"] and push.exit_code(again) == 0   # a success
    assert "already there" in again[0].line()
    assert push.exit_code(first + again) == 0
    assert not (tmp_path / "outbox").exists()


def test_rejected_with_the_servers_reason(env, tmp_path):
    fleet, server = env
    path = _write(fleet, tmp_path, 2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    result = push.push_files([path], server.url, fleet.devices["dev-0"][0], tmp_path / "outbox", FAST)
    assert result[0].status == "rejected" and result[0].code == "body_hash_mismatch"
    assert result[0].attempts == 1, "a 4xx is never retried"
    assert "body_sha256" in result[0].line() and push.exit_code(result) == 2
    # Wrong token: rejected by the server, not queued.
    wrong = push.push_files([_write(fleet, tmp_path, 3)], server.url, "ecl_nope", tmp_path / "outbox", FAST)
    assert wrong[0].code == "auth_invalid" and not (tmp_path / "outbox").exists()
    # A file that is not a delta is refused here, before any network.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello")
    local = push.push_files([junk], "http://127.0.0.1:9", "t", tmp_path / "outbox", FAST)
    assert local[0].status == "rejected" and local[0].code == "truncated"


def test_unreachable_goes_to_the_outbox_then_flushes(env, tmp_path):
    fleet, server = env
    token = fleet.devices["dev-1"][0]
    outbox = tmp_path / "outbox"
    paths = [_write(fleet, tmp_path, s, device="dev-1") for s in (10, 11, 12)]
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    results = push.push_files(paths, dead, token, outbox, FAST)
    assert time.monotonic() - started < 3, "retries are bounded"
    assert [r.status for r in results] == ["unreachable"] * 3 and push.exit_code(results) == 3
    assert results[0].attempts == FAST.retries + 1
    queued = sorted(p.name for p in outbox.glob("*.safetensors"))
    assert queued == sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()}.safetensors" for p in paths)
    # Pushing again while offline keeps one copy per delta.
    push.push_files(paths[:1], dead, token, outbox, FAST)
    assert len(list(outbox.glob("*.safetensors"))) == 3
    # Back online: the outbox drains; the files are byte-identical on the server.
    flushed = push.flush_outbox(server.url, token, outbox, FAST)
    assert [r.status for r in flushed] == ["sent"] * 3 and push.exit_code(flushed) == 0
    assert not list(outbox.glob("*.safetensors"))
    for p in paths:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        assert fleet.store.get_blob(sha) == p.read_bytes()


def test_rejected_outbox_file_is_set_aside(env, tmp_path):
    fleet, server = env
    outbox = tmp_path / "outbox"
    data = D.save(make_delta(fleet.manifest, "dev-0", 20), fleet.devices["dev-1"][1])  # signed with the wrong key
    queued = push.queue(data, outbox)
    results = push.flush_outbox(server.url, fleet.devices["dev-0"][0], outbox, FAST)
    assert results[0].code == "signature_invalid" and push.exit_code(results) == 2
    assert not queued.exists() and (outbox / "rejected" / queued.name).exists()
    assert "signature_invalid" in (outbox / "rejected" / f"{queued.name}.reason.txt").read_text()


def test_retries_until_the_server_comes_up(env, tmp_path):
    fleet, _ = env
    path = _write(fleet, tmp_path, 30)
    port = free_port()
    late = ServerProcess(fleet.store.root)
    starter = threading.Timer(0.3, lambda: late.start(port=port))
    starter.start()
    try:
        policy = RetryPolicy(retries=8, backoff_s=0.2, max_backoff_s=1.0, timeout_s=5)
        result = push.push_files([path], f"http://127.0.0.1:{port}", fleet.devices["dev-0"][0], tmp_path / "o", policy)
        assert result[0].status == "sent" and result[0].attempts > 1
    finally:
        starter.join()
        late.stop()


def test_backoff_is_bounded():
    policy = RetryPolicy(retries=10, backoff_s=0.5, max_backoff_s=8.0)
    delays = [policy.delay(i) for i in range(10)]
    assert all(0.25 <= d <= 8.0 for d in delays) and max(delays[:2]) <= 1.0


def test_push_cli_exit_codes(env, tmp_path, monkeypatch):
    from edgecl.cli.main import app

    fleet, server = env
    runner = CliRunner()
    monkeypatch.setenv("EDGECL_OUTBOX", str(tmp_path / "outbox"))
    token = fleet.devices["dev-0"][0]
    path = _write(fleet, tmp_path, 40)
    args = ["--server", server.url, "--token", token, "--retries", "1"]
    sent = runner.invoke(app, ["push", str(path), *args])
    assert sent.exit_code == 0 and "sent" in sent.output, sent.output
    again = runner.invoke(app, ["push", str(path), *args])
    assert again.exit_code == 0 and "already there" in again.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    rejected = runner.invoke(app, ["push", str(bad), *args])
    assert rejected.exit_code == 2 and "body_hash_mismatch" in rejected.output
    offline = runner.invoke(app, ["push", str(_write(fleet, tmp_path, 41)), "--server",
                                  f"http://127.0.0.1:{free_port()}", "--token", token, "--retries", "0"])
    assert offline.exit_code == 3 and "kept in" in offline.output
    flushed = runner.invoke(app, ["push", "--outbox", *args])
    assert flushed.exit_code == 0 and "sent" in flushed.output
    empty = runner.invoke(app, ["push", "--outbox", *args])
    assert empty.exit_code == 0 and "outbox empty" in empty.output
    usage = runner.invoke(app, ["push", "--server", server.url, "--token", token])
    assert usage.exit_code == 1 and "nothing to push" in usage.output
