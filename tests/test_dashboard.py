"""The dashboard page in a real headless Chromium (Debian `chromium`) against a real server with real
pushed deltas, merges and releases: what the page shows is read back from the rendered DOM.

As in the README's quickstart, the first version is never released through the release check: the
devices run it, so the page must call it released."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_server import ServerProcess, make_bundle_dir, make_fleet

from edgecl.formats import delta as D
from edgecl.server.dashboard import PAGE
from edgecl.server.store import add_bundle_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", *extra, url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _cells(dom: str, table: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    fleet = make_fleet(root / "store", 3)
    v1 = make_bundle_dir(root / "v1", bundle_id="line-s", version=1)
    v2 = make_bundle_dir(root / "v2", bundle_id="line-s", version=2, seed=1, parent=v1)
    for folder in (v1, v2):
        add_bundle_dir(fleet.store, folder)
    server = ServerProcess(root / "store").start()
    manifests = {v: __import__("json").loads((f / "manifest.json").read_text()) for v, f in ((1, v1), (2, v2))}
    reports = {("dev-0", 1): (0.40, 0.70), ("dev-1", 1): (0.50, 0.90), ("dev-0", 2): (0.70, 0.80)}
    with httpx.Client(base_url=server.url) as client:
        for (device, version), (before, after) in reports.items():
            d = make_delta(manifests[version], device, version * 10 + int(device[-1]))
            d.heldout = {"before": {"accuracy": before, "images": 20}, "after": {"accuracy": after, "images": 20}}
            r = client.post("/v1/deltas", content=D.save(d, fleet.devices[device][1]), headers=fleet.headers(device))
            assert r.status_code == 201, r.text
        assert client.post("/v1/bundles/line-s/1/merge", params={"wait_s": 60}, headers=fleet.admin()).status_code == 200
        # What `edgecl release` posts (edgecl.release: the summary of its table).
        groups = {"calibration": {"classes": ["a", "b"], "images": 24, "candidate": 0.75, "baseline": 0.70,
                                  "current": 0.80},
                  "device:dev-0": {"classes": ["c"], "images": 16, "candidate": 1.0, "baseline": 0.9375,
                                   "current": None}}
        r = client.post("/v1/releases", headers=fleet.admin(), json={
            "bundle_id": "line-s", "version": 2, "canary": ["dev-0"],
            "report": {"candidate": {"accuracy": 0.85, "images": 40}, "baseline": {"accuracy": 0.795, "images": 40},
                       "current": {"accuracy": 0.80, "images": 24}, "groups": groups}})
        assert r.status_code == 201, r.text
    fleet.store.revoke_device("dev-2")
    yield fleet, server
    server.stop()
    fleet.store.close()


def test_dashboard_shows_names_the_release_checks_and_what_devices_run(fleet_server, tmp_path):
    fleet, server = fleet_server
    dom = _chromium(tmp_path, f"{server.url}/dashboard#token={fleet.admin_token}", "--dump-dom")
    assert 'data-loaded="1"' in dom, dom[-3000:]
    assert "4 devices, 3 deltas, 3 bundle versions, 1 release" in dom     # + line-a v1 of the fleet fixture
    # Names, not ids: the model name from each stored version's manifest; a registered-only one keeps a short id.
    assert not re.search(r">[0-9a-f]{32}<", dom), "no 32-hex-digit id is shown as text"
    devices = {row[0]: row for row in _cells(dom, "devices")}
    assert devices["dev-0"][2] == "hand-made v2" and devices["dev-0"][4] == "push"
    assert devices["dev-0"][5:7] == ["70.0%", "80.0%"]                      # its last report (v2)
    assert devices["dev-1"][2] == "hand-made v1" and devices["dev-1"][5:7] == ["50.0%", "90.0%"]
    assert devices["dev-2"][3] == "never" and devices["dev-2"][7] == "revoked"
    assert devices["ops"][1] == "admin"
    versions = {(row[0], row[1]): row for row in _cells(dom, "versions")}
    # v1 never went through the release check, but dev-1 runs it: released.
    assert versions[("hand-made", "1")][2:9] == ["2", "2", "yes", "yes (1 device runs it)", "45.0%", "80.0%", "-"]
    assert versions[("hand-made", "2")][2:9] == ["1", "1", "yes", "canary: dev-0", "70.0%", "80.0%", "85.0%"]
    assert versions[("line-a", "1")][4:6] == ["no", "no"]
    merges = _cells(dom, "merges")
    assert [m[:5] for m in merges] == [["hand-made", "1", "2", "weighted-mean", "dev-0, dev-1"]]
    releases = {row[1]: row for row in _cells(dom, "releases")}
    assert releases["2"][3] == "dev-0"
    assert releases["2"][4] == "passed: candidate 85.0% of 40 held-out images (ncm)"   # the figure release prints
    # The chart: per class group of the release check, a bar per series, labelled as `edgecl release` labels them.
    bars = re.findall(r'<rect[^>]*data-series="([a-z]+)" data-group="([^"]+)" data-version="(\d+)" '
                      r'data-value="([0-9.]+)"', dom)
    assert set(bars) == {
        ("baseline", "v1's own classes", "2", "0.7000"), ("current", "v1's own classes", "2", "0.8000"),
        ("candidate", "v1's own classes", "2", "0.7500"),
        ("baseline", "new classes of dev-0", "2", "0.9375"), ("candidate", "new classes of dev-0", "2", "1.0000"),
        ("baseline", "all held-out images", "2", "0.7950"), ("candidate", "all held-out images", "2", "0.8500")}
    assert "hand-made v2 (candidate) vs v1, canary" in dom


def test_dashboard_without_or_with_a_wrong_token(fleet_server, tmp_path):
    fleet, server = fleet_server
    dom = _chromium(tmp_path, f"{server.url}/dashboard", "--dump-dom")
    assert 'id="login" style="display: block;"' in dom and "sign in with an admin token" in dom
    dom = _chromium(tmp_path / "b", f"{server.url}/dashboard#token={fleet.devices['dev-0'][0]}", "--dump-dom")
    assert "forbidden: dev-0 is not an admin" in dom and 'id="content" style="display:none"' in dom


def test_dashboard_is_self_contained_and_renders(fleet_server, tmp_path):
    fleet, server = fleet_server
    urls = set(re.findall(r"https?://[^\s\"')]+", PAGE))
    assert urls == {"http://www.w3.org/2000/svg"}, "no CDN, no external asset: only the SVG namespace name"
    shot = tmp_path / "dashboard.png"
    _chromium(tmp_path, f"{server.url}/dashboard#token={fleet.admin_token}", f"--screenshot={shot}",
              "--window-size=1100,1100", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    target = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
    if not target.exists():        # the screenshot kept in docs/ is made by this test
        target.write_bytes(data)


def test_the_first_version_stays_released_after_devices_moved_on(fleet_server, tmp_path):
    """After `edgecl pull` no device runs v1 any more; it was still the version in service (runs last: it moves dev-1)."""
    fleet, server = fleet_server
    with httpx.Client(base_url=server.url) as client:
        r = client.post("/v1/heartbeat", headers=fleet.headers("dev-1"),
                        json={"event": "upgraded", "bundle_id": "line-s", "version": 2})
        assert r.status_code == 200, r.text
    dom = _chromium(tmp_path, f"{server.url}/dashboard#token={fleet.admin_token}", "--dump-dom")
    versions = {(row[0], row[1]): row for row in _cells(dom, "versions")}
    assert versions[("hand-made", "1")][5] == "yes (first version; v2 since)"
    assert versions[("hand-made", "2")][5] == "canary: dev-0"
    assert versions[("line-a", "1")][5] == "no"
