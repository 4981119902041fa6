"""A throwaway PostgreSQL on a free loopback port: initdb into a fresh folder, start ``postgres``,
wait until it answers, and on exit stop it and delete the folder. The test suite's ``postgres``
fixture (tests/edgecl_test_postgres.py) and B5 (``--start-postgres``) both use it. Never a mock.

PostgreSQL refuses to run as root: as root it runs as ``nobody``, from a fresh /tmp folder that
``nobody`` owns (it could not enter a root-only 0700 folder such as pytest's tmp_path).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PG_BIN_ENV = "EDGECL_PG_BIN"       # a folder holding initdb and postgres (default: the newest /usr/lib/postgresql/*/bin)


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries, or None where PostgreSQL is not installed."""
    candidates = [os.environ.get(PG_BIN_ENV, "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(max_connections: int = 200, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Yields ``postgresql://edgecl@127.0.0.1:PORT/postgres`` (user ``edgecl``, trust auth, loopback
    only). Its log is ``postgres.log`` in the data folder's parent, quoted when it fails to start.
    Durability settings are PostgreSQL's defaults (fsync on): only initdb skips its own fsyncs."""
    binaries = pg_bin()
    if binaries is None:
        raise FileNotFoundError(f"PostgreSQL binaries not found (apt-get install postgresql, or set {PG_BIN_ENV})")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "nobody", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="edgecl-pg-"))
    if as_root:
        shutil.chown(root, "nobody")
    data, sock = root / "data", root / "sock"
    proc, log = None, None
    try:
        subprocess.run(prefix + [str(binaries / "initdb"), "-D", str(data), "-U", "edgecl", "--auth=trust",
                                 "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        sock.mkdir()
        if as_root:
            shutil.chown(sock, "nobody")
        port = _free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 (kept open for the server's lifetime)
        proc = subprocess.Popen(prefix + [str(binaries / "postgres"), "-D", str(data), "-p", str(port),
                                          "-k", str(sock), "-c", "listen_addresses=127.0.0.1",
                                          "-c", f"max_connections={max_connections}"],
                                stdout=log, stderr=log)
        url = f"postgresql://edgecl@127.0.0.1:{port}/postgres"
        import psycopg

        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start: "
                                       + (root / "postgres.log").read_text(errors="replace")[-2000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            # pg_ctl, not a signal to our child: `runuser` does not forward SIGINT to postgres.
            subprocess.run(prefix + [str(binaries / "pg_ctl"), "stop", "-D", str(data), "-m", "fast"],
                           capture_output=True, timeout=60)
            proc.wait(30)
        if log is not None:
            log.close()
        shutil.rmtree(root, ignore_errors=True)
