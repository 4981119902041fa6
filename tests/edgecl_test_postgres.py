"""A real PostgreSQL server for tests: initdb + postgres on a free loopback port, started once per
module and stopped after it; skipped where PostgreSQL is not installed. Never a mock."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from edgecl_test_server import free_port


def _pg_bin() -> Path | None:
    candidates = [os.environ.get("EDGECL_PG_BIN", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").exists()), None)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql, or set EDGECL_PG_BIN)")
    as_root = os.geteuid() == 0
    # PostgreSQL refuses to run as root. As root we run it as `nobody`, which cannot enter pytest's
    # root-only (0700) tmp folders, so its data lives in a fresh /tmp folder that `nobody` owns.
    if as_root:
        root = Path(tempfile.mkdtemp(prefix="edgecl-pg-"))
        shutil.chown(root, "nobody")
        prefix = ["runuser", "-u", "nobody", "--"]
    else:
        root, prefix = tmp_path_factory.mktemp("pg"), []
    data, sock = root / "data", root / "sock"
    proc, log = None, None
    try:
        subprocess.run(prefix + [str(pg_bin / "initdb"), "-D", str(data), "-U", "edgecl", "--auth=trust", "-E", "UTF8",
                                 "--no-sync"], check=True, capture_output=True, timeout=60)
        sock.mkdir()
        if as_root:
            shutil.chown(sock, "nobody")
        port = free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 (kept open for the server's lifetime)
        proc = subprocess.Popen(prefix + [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                                          "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
                                stdout=log, stderr=log)
        url = f"postgresql://edgecl@127.0.0.1:{port}/postgres"
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            # pg_ctl, not a signal to our child: `runuser` does not forward SIGINT to postgres.
            subprocess.run(prefix + [str(pg_bin / "pg_ctl"), "stop", "-D", str(data), "-m", "fast"],
                           capture_output=True, timeout=60)
            proc.wait(30)
        if log is not None:
            log.close()
        shutil.rmtree(root, ignore_errors=True)
