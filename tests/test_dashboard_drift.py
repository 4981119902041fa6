"""Drift over time on the dashboard: real `edgecl watch` runs (the device's own Watcher, a tiny bundle
exported by the real host path, real PNG files) send their heartbeats to a real server on loopback;
the server keeps a bounded history per device; the page, rendered in headless Chromium, draws every
reported point. Absurd figures are refused with a named reason, and nothing is stored for them."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from edgecl_test_postgres import postgres  # noqa: F401 (a fixture)
from edgecl_test_server import ServerProcess
from test_dashboard import CHROMIUM, _chromium

from edgecl.device.provision import DeviceConfig, save_device_config
from edgecl.device.watch import Watcher, WatchOptions
from edgecl.server.drift import DriftPoint, parse_drift
from edgecl.server.service import Rejected
from edgecl.server.store import Store, add_bundle_dir

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _known(calib_dir: Path, cam: Path, n: int, start: int) -> None:
    """n images of the classes the bundle knows, as a camera writes them (temp name, then rename)."""
    files = sorted(calib_dir.rglob("*.png"))
    for i in range(n):
        src = files[(start + i * 5) % len(files)]
        shutil.copyfile(src, cam / f".k{i}.png")
        (cam / f".k{i}.png").rename(cam / f"known-{start}-{i}.png")


def _new_product(products: Path, cam: Path, n: int, start: int) -> None:
    """n images of a product the bundle never saw (its colour, a stripe elsewhere), as the camera writes them."""
    files = sorted((products / "new-part").iterdir())
    for i in range(n):
        shutil.copyfile(files[(start + i) % len(files)], cam / f".n{i}.png")
        (cam / f".n{i}.png").rename(cam / f"new-{start}-{i}.png")


# Per run, how many of line1-cam's 12 images are of the new product; after run ADAPT_AFTER the operator
# labels it and adapts (the bundle's own state, gen-000001), and watch recognizes it from then on.
NEW_ON_LINE1 = (0, 0, 0, 3, 6, 9, 9, 9)
RUNS = len(NEW_ON_LINE1)
ADAPT_AFTER = 5


@pytest.fixture(scope="module")
def line(tmp_path_factory, tiny_bundle, calib_dir):
    """Two devices on a line, eight `edgecl watch --once` runs each, side by side in time: line1-cam
    starts seeing a new product at the fourth run and adapts to it after the sixth; line2-cam sees only
    known products. Yields the server, the admin token, what each device sent, and the store."""
    from edgecl.datasets import write_synthetic_classes
    from edgecl.device.adapt import adapt
    from edgecl.device.plan import AdaptOptions

    root = tmp_path_factory.mktemp("drift")
    # class3 of the synthetic set: class0's colour with a stripe elsewhere, flagged unknown by the tiny bundle.
    products = write_synthetic_classes(root / "products", ["k0", "k1", "k2", "new-part"], 24, seed=7)
    labeled = root / "labeled" / "new-part"
    shutil.copytree(products / "new-part", labeled)
    store = Store(root / "store")
    add_bundle_dir(store, tiny_bundle)                 # stored whole: the page names it by its model
    admin, _ = store.register_device("ops", admin=True)
    tokens = {name: store.register_device(name)[0] for name in ("line1-cam", "line2-cam", "line3-cam")}
    server = ServerProcess(root / "store").start()
    sent: dict[str, list[dict]] = {"line1-cam": [], "line2-cam": []}   # line3-cam never runs watch
    patch = pytest.MonkeyPatch()
    try:
        for name in sent:
            shutil.copytree(tiny_bundle, root / name / "bundle")
            save_device_config(DeviceConfig(server=server.url, name=name, token=tokens[name],
                                            bundle=str((root / name / "bundle").resolve())), root / name / "device.toml")
        for run in range(RUNS):
            for name in sent:
                bundle = root / name / "bundle"
                patch.setenv("EDGECL_DEVICE_CONFIG", str(root / name / "device.toml"))
                cam = root / name / f"cam-{run}"
                cam.mkdir()
                new = NEW_ON_LINE1[run] if name == "line1-cam" else 0
                _known(calib_dir, cam, 12 - new, start=run)
                _new_product(products, cam, new, start=3 * run)
                # heartbeat_s: only the one at exit, so each run is one point (by default watch also sends every 5 min).
                watcher = Watcher(bundle, cam, WatchOptions(settle_s=0.0, heartbeat_s=1e9), log=root / name / "w.jsonl")
                report = watcher.run(once=True)
                assert report.images == 12 and len(watcher.heartbeats) == 1, (report, watcher.heartbeats)
                sent[name].append(watcher.heartbeats[0])
                if name == "line1-cam" and run == ADAPT_AFTER:
                    adapt(bundle, labeled.parent, AdaptOptions(epochs=0, progress=False))
        yield server, admin, sent, store
    finally:
        patch.undo()
        server.stop()
        store.close()


def _series(server: ServerProcess, admin: str, **params) -> httpx.Response:
    return httpx.get(server.url + "/v1/drift", params=params, headers={"Authorization": f"Bearer {admin}"})


def test_the_server_keeps_each_devices_reports_as_a_series(line):
    server, admin, sent, _ = line
    answer = _series(server, admin)
    assert answer.status_code == 200, answer.text
    series = {s["device"]: s for s in answer.json()["devices"]}
    assert set(series) == {"line1-cam", "line2-cam"}
    for name, bodies in sent.items():
        s = series[name]
        assert s["points"] == RUNS and s["received_ns"] == sorted(s["received_ns"])
        for key in ("unknown_rate", "mean_confidence", "embedding_shift", "images_total", "window_images", "state"):
            assert s[key] == [b["drift"][key] for b in bodies], key
        assert s["version"] == [1] * RUNS and s["images_total"][-1] == 12 * RUNS
    # The story the chart tells: the new product raises line1-cam's unknown rate and shift, not line2-cam's;
    # once adapted (its own state from then on), line1-cam knows it and the figures come back down.
    one, two = series["line1-cam"], series["line2-cam"]
    peak = one["unknown_rate"][ADAPT_AFTER]
    assert peak >= one["unknown_rate"][0] + 0.5 and max(two["unknown_rate"]) <= 0.25, (one, two)
    assert one["embedding_shift"][ADAPT_AFTER] > 2 * max(two["embedding_shift"]), (one, two)
    assert all(u <= peak - 0.5 for u in one["unknown_rate"][ADAPT_AFTER + 1:]), one["unknown_rate"]
    assert one["state"] == ["bundle"] * (ADAPT_AFTER + 1) + ["gen-000001"] * (RUNS - ADAPT_AFTER - 1)
    assert set(two["state"]) == {"bundle"}
    last = _series(server, admin, device="line1-cam", last=2).json()["devices"]
    assert len(last) == 1 and last[0]["unknown_rate"] == one["unknown_rate"][-2:]
    assert _series(server, admin, device="nope").status_code == 404
    assert _series(server, admin, last=0).status_code == 422


@needs_chromium
def test_the_dashboard_draws_every_point_per_device(line, tmp_path):
    server, admin, sent, _ = line
    dom = _chromium(tmp_path, f"{server.url}/dashboard#token={admin}", "--dump-dom")
    assert 'data-loaded="1"' in dom, dom[-3000:]
    chart = re.search(r'<svg[^>]*id="drift-chart".*?</svg>', dom, re.S)
    assert chart, dom[-3000:]
    rows = dict(re.findall(r'data-device="([^"]+)">(.*?)(?=<g class="drift-device"|$)', chart.group(0), re.S))
    assert set(rows) == {"line1-cam", "line2-cam"}
    for name, bodies in sent.items():
        assert f">{name}<" in rows[name]                                  # the name, not an id
        for key in ("unknown_rate", "mean_confidence", "embedding_shift"):
            group = re.search(rf'<g class="drift" data-metric="{key}" data-points="(\d+)">(.*?)</g>', rows[name], re.S)
            assert group and int(group.group(1)) == RUNS, key
            drawn = [float(v) for v in re.findall(r'<circle[^>]*data-value="([0-9.]+)"', group.group(2))]
            assert drawn == pytest.approx([b["drift"][key] for b in bodies], abs=1e-4), key
            assert "<path" in group.group(2)
        newest = bodies[-1]["drift"]["unknown_rate"]
        assert re.search(rf'class="last" data-metric="unknown_rate">{100 * newest:.1f}%<', rows[name])
    # The model's name and the state served; a dashed line where line1-cam's state changed (both panels).
    assert "test_efficientnet v1 + gen-000001" in rows["line1-cam"] and "test_efficientnet v1 as shipped" in rows["line2-cam"]
    assert rows["line1-cam"].count('class="change"') == 2 and 'class="change"' not in rows["line2-cam"]
    assert not re.search(r">[0-9a-f]{32}<", dom), "no 32-hex-digit id is shown as text"
    assert "No reports yet from line3-cam" in dom
    shot = tmp_path / "drift.png"
    _chromium(tmp_path, f"{server.url}/dashboard#token={admin}", f"--screenshot={shot}", "--window-size=1160,900",
              "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if not (DOCS / "dashboard-drift.png").exists():      # the screenshot kept in docs/ is made by this test
        (DOCS / "dashboard-drift.png").write_bytes(data)


@needs_chromium
def test_a_server_without_reports_says_how_to_get_them(tmp_path):
    store = Store(tmp_path / "store")
    admin, _ = store.register_device("ops", admin=True)
    store.register_device("line1-cam")
    server = ServerProcess(tmp_path / "store").start()
    try:
        dom = _chromium(tmp_path, f"{server.url}/dashboard#token={admin}", "--dump-dom")
    finally:
        server.stop()
        store.close()
    assert 'data-loaded="1"' in dom and 'id="drift-empty"' in dom
    assert "No drift reports yet" in dom and "edgecl watch BUNDLE CAMERA_DIR" in dom and "--server URL" in dom


_ODD = itertools.count()
GOOD = {"window_images": 12, "images_total": 40, "unknown_rate": 0.25, "mean_confidence": 0.8,
        "embedding_shift": 1.5, "state": "gen-000002"}


@pytest.mark.parametrize(("change", "named"), [
    ({"unknown_rate": 1.5}, "unknown_rate = 1.5 is outside [0, 1]"),
    ({"mean_confidence": -0.1}, "mean_confidence = -0.1 is outside [0, 1]"),
    ({"embedding_shift": 3e38}, "embedding_shift = 3e+38 is outside [0, 10000]"),
    ({"embedding_shift": float("nan")}, "embedding_shift = nan is outside"),
    ({"unknown_rate": "high"}, "unknown_rate is 'high', not a number"),
    ({"unknown_rate": True}, "unknown_rate is 'True', not a number"),
    ({"window_images": -1}, "window_images = -1 is not a whole number"),
    ({"images_total": 2.5}, "images_total = 2.5 is not a whole number"),
    ({"window_images": 41}, "window_images = 41 is more than images_total = 40"),
    ({"state": "../HEAD"}, "state '../HEAD' is not a generation name"),
])
def test_absurd_figures_are_refused_with_a_named_reason(line, change, named):
    server, admin, _, store = line
    token, _ = store.register_device(f"odd-{next(_ODD)}")
    before = _series(server, admin).json()
    body = json.dumps({"event": "watch", "bundle_id": "x", "version": 1, "drift": {**GOOD, **change}})
    answer = httpx.post(server.url + "/v1/heartbeat", content=body,           # json.dumps writes NaN as NaN
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error"] == "drift_invalid", answer.text
    assert named in answer.json()["message"]
    assert _series(server, admin).json() == before                       # nothing stored
    ok = httpx.post(server.url + "/v1/heartbeat", json={"event": "watch", "drift": GOOD},
                    headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.text


def test_parse_drift_keeps_missing_figures_as_none() -> None:
    point = parse_drift({"window_images": 3, "images_total": 3, "unknown_rate": None, "mean_confidence": 0.5,
                         "embedding_shift": None, "state": "bundle", "newer_field": 1})
    assert point == DriftPoint("bundle", 3, 3, None, 0.5, None)
    with pytest.raises(Rejected, match="expected an object"):
        parse_drift([1])


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_history_is_bounded_per_device(dialect, tmp_path, request):
    db = request.getfixturevalue("postgres") if dialect == "postgresql" else None
    store = Store(tmp_path / "store", db)
    try:
        for name in ("busy", "quiet"):
            store.register_device(name)
        for i in range(25):
            store.add_drift_report("busy", "watch", "b", 1, DriftPoint("bundle", 1, i + 1, i / 100, 0.9, 0.1), keep=10)
        store.add_drift_report("quiet", "watch", "b", 1, DriftPoint("bundle", 1, 1, 0.0, 0.9, 0.1), keep=10)
        series = {s["device"]: s for s in store.drift_series()}
        assert series["busy"]["points"] == 10 and series["busy"]["images_total"] == list(range(16, 26))
        assert series["quiet"]["points"] == 1
        assert [s["images_total"] for s in store.drift_series("busy", last=3)] == [[23, 24, 25]]
        assert next(d for d in store.list_devices() if d["name"] == "busy")["last_event"] == "watch"
    finally:
        store.close()


@needs_chromium
def test_a_full_history_of_several_devices_is_drawn_as_lines(tmp_path):
    """Eight devices at the bound (2016 reports each, a week at one every 5 minutes): the server answers
    every point, the page draws each series as one line (no per-point marks) on one week-long axis.
    Rows are written straight into the table: the heartbeat path is the other tests' subject."""
    import sqlite3
    import time

    store = Store(tmp_path / "store")
    admin, _ = store.register_device("ops", admin=True)
    names = [f"press-{i}" for i in range(8)]
    for name in names:
        store.register_device(name)
    start_ns = time.time_ns() - 7 * 86400 * 10**9
    rng = __import__("numpy").random.default_rng(0)
    rows = [(name, start_ns + j * 300 * 10**9, "b", 1, "bundle", 500, 500 * (j + 1), float(rng.uniform(0, 0.1)),
             float(rng.uniform(0.8, 1.0)), None if j % 500 == 7 else float(rng.uniform(0, 0.5 + d)))
            for d, name in enumerate(names) for j in range(2016)]
    with sqlite3.connect(tmp_path / "store" / "edgecl.sqlite3") as db:
        db.executemany("INSERT INTO drift_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    server = ServerProcess(tmp_path / "store").start()
    try:
        answer = _series(server, admin)
        dom = _chromium(tmp_path, f"{server.url}/dashboard#token={admin}", "--dump-dom")
    finally:
        server.stop()
        store.close()
    assert [s["points"] for s in answer.json()["devices"]] == [2016] * 8
    assert 'data-loaded="1"' in dom, dom[-3000:]
    chart = re.search(r'<svg[^>]*id="drift-chart".*?</svg>', dom, re.S).group(0)
    assert "<circle" not in chart
    for name in names:
        row = re.search(rf'data-device="{name}">(.*?)(?=<g class="drift-device"|$)', chart, re.S).group(1)
        shift = re.search(r'data-metric="embedding_shift" data-points="(\d+)"><path d="([^"]+)"', row)
        # Five reports without a shift (null) are gaps: the line starts anew after each.
        assert int(shift.group(1)) == 2016 - 5 and shift.group(2).count("M") == 6
        assert shift.group(2).count("M") + shift.group(2).count("L") == 2016 - 5
    ticks = re.findall(r'<text[^>]*fill="#555">(\d\d-\d\d \d\d:\d\d)</text>', chart)
    assert len(ticks) == 10, ticks                                   # a week: dates on the axis, both panels


def test_a_postgresql_server_keeps_the_same_series(line, postgres, tmp_path):  # noqa: F811 (the imported fixture)
    """What line1-cam's watch sent, sent again to a server on PostgreSQL: the same series comes back."""
    _, _, sent, _ = line
    store = Store(tmp_path / "store", postgres)
    admin, _ = store.register_device("pg-ops", admin=True)
    token, _ = store.register_device("pg-line1-cam")
    server = ServerProcess(tmp_path / "store", db=postgres).start()
    try:
        for body in sent["line1-cam"]:
            answer = httpx.post(server.url + "/v1/heartbeat", json=body, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        series = _series(server, admin, device="pg-line1-cam").json()["devices"]
    finally:
        server.stop()
        store.close()
    assert len(series) == 1 and series[0]["points"] == RUNS
    for key in ("unknown_rate", "mean_confidence", "embedding_shift", "images_total", "state"):
        assert series[0][key] == [b["drift"][key] for b in sent["line1-cam"]], key
