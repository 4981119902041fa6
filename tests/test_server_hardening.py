"""Server hardening over real sockets: slow clients are dropped while /health stays fast, one client
cannot take every connection, a stalled body times out, and `--workers N` children die with their
parent after kill -9 (no orphan keeps the port)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_server import REPO, ServerProcess, free_port, make_fleet

from edgecl.formats import delta as D


def _stalled(port: int, n: int) -> list[socket.socket]:
    """n connections that each send half a request head and then nothing (slow loris)."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/deltas HTTP/1.1\r\nHost: x\r\nContent-Type: application/oct")
        out.append(s)
    return out


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.2)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_slow_loris_dropped_while_health_stays_fast(tmp_path):
    fleet = make_fleet(tmp_path / "store", 1)
    server = ServerProcess(tmp_path / "store", header_timeout_s=1.5, max_connections_per_client=128).start()
    socks = []
    try:
        socks = _stalled(server.port, 60)
        time.sleep(0.3)
        with httpx.Client(base_url=server.url) as client:
            for _ in range(10):
                started = time.monotonic()
                assert client.get("/health", timeout=5).status_code == 200
                assert time.monotonic() - started < 0.5, "health must stay fast while 60 clients stall"
            # a real push goes through meanwhile
            data = D.save(make_delta(fleet.manifest, "dev-0", 1), fleet.devices["dev-0"][1])
            assert client.post("/v1/deltas", content=data, headers=fleet.headers("dev-0")).status_code == 201
        assert not any(_closed(s) for s in socks[:5]), "not before the header deadline"
        time.sleep(1.8)
        assert all(_closed(s) for s in socks), "every stalled connection is dropped after the header deadline"
        assert httpx.get(server.url + "/health", timeout=2).status_code == 200
    finally:
        for s in socks:
            s.close()
        server.stop()
        fleet.store.close()


def test_per_client_connection_cap_and_body_timeout(tmp_path):
    fleet = make_fleet(tmp_path / "store", 1)
    server = ServerProcess(tmp_path / "store", header_timeout_s=30.0, max_connections_per_client=8,
                           body_idle_s=1.0).start()
    socks = []
    try:
        socks = _stalled(server.port, 8)          # the cap: every slot of this address held by idle heads
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in answer
        for s in socks:
            s.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200, "slots come back when closed"
        # a body that stops half-way: 408 after body_idle_s, with the JSON shape
        data = D.save(make_delta(fleet.manifest, "dev-0", 2), fleet.devices["dev-0"][1])
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/deltas HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + fleet.devices["dev-0"][0].encode()
                  + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[:len(data) // 2])
        started = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):          # the server closes the connection after the 408
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 408") and b'"error":"timeout"' in reply, reply[:300]
        assert 0.8 < time.monotonic() - started < 5
        # a body that trickles (a few bytes every half second, never idle for body_idle_s): 408 too
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/deltas HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + fleet.devices["dev-0"][0].encode()
                  + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[:8])
        reply = b""
        for start in range(8, len(data), 50):
            try:
                s.sendall(data[start:start + 50])
            except OSError:
                break
            s.settimeout(0.5)
            try:
                reply += s.recv(4096)
            except TimeoutError:
                continue
            if reply:
                break
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 408") and b"B/s" in reply, reply[:300]
        assert fleet.store.count_deltas() == 0
    finally:
        for s in socks:
            s.close()
        server.stop()
        fleet.store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_the_parent_after_kill_9(tmp_path):
    make_fleet(tmp_path / "store", 1).store.close()
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    parent = subprocess.Popen([sys.executable, "-c", "from edgecl.cli.main import main; main()", "server", "start",
                               "--port", str(port), "--store", str(tmp_path / "store"), "--workers", "2",
                               "--log-level", "warning"], cwd=REPO, stdout=log, stderr=log,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "server.log").read_text()[-2000:])
        children = _children(parent.pid)
        assert len(children) >= 2, children
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "orphan workers outlived the parent"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if parent.poll() is None:
            parent.kill()
        for c in _children(parent.pid):
            os.kill(c, signal.SIGKILL)
        log.close()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_many_address_slow_loris_cannot_take_health_admin_or_established_devices(tmp_path):
    """Stalled connections from many addresses, past the whole connection budget: each newcomer
    sheds the oldest stalled one, so /health, an admin and a device that is already connected are
    still served (uvicorn's limit_concurrency alone answered them 503)."""
    fleet = make_fleet(tmp_path / "store", 1)
    server = ServerProcess(tmp_path / "store", header_timeout_s=60, max_connections=40,
                           max_connections_per_client=64).start()
    socks: list[socket.socket] = []
    try:
        with httpx.Client(base_url=server.url, headers=fleet.headers("dev-0"), timeout=5) as device:
            assert device.get("/v1/bundles").status_code == 200          # an established keep-alive device
            for n in range(120):                                            # 3x the budget, from 12 addresses
                s = socket.socket()
                s.bind((f"127.0.0.{2 + n % 12}", 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", server.port))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(s)
            time.sleep(0.3)
            for _ in range(10):
                started = time.monotonic()
                assert httpx.get(server.url + "/health", timeout=5).status_code == 200
                assert time.monotonic() - started < 1.0
            assert httpx.get(server.url + "/v1/devices", headers=fleet.admin(), timeout=5).status_code == 200
            data = D.save(make_delta(fleet.manifest, "dev-0", 7), fleet.devices["dev-0"][1])
            assert device.post("/v1/deltas", content=data).status_code == 201
        assert sum(_closed(s) for s in socks) >= 80, "the oldest stalled connections were shed"
    finally:
        for s in socks:
            s.close()
        server.stop()
        fleet.store.close()
