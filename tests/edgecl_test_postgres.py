"""A real PostgreSQL server for tests: initdb + postgres on a free loopback port, started once per
module and stopped after it; skipped where PostgreSQL is not installed. Never a mock. The starter
itself (benchmarks/shared/postgres.py) is shared with B5 (``b5_server.py --start-postgres``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The benchmarks are a package at the checkout's root (benchmarks/__init__.py), not installed with edgecl.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared.postgres import pg_bin, throwaway_postgres  # noqa: E402


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql, or set EDGECL_PG_BIN)")
    with throwaway_postgres(max_connections=200) as url:
        yield url
