"""`edgecl review`: the queue's labels through the CLI, the HTTP API and the page itself in a real
headless Chromium (driven over the DevTools protocol on a pipe: clicks, not requests), and the whole
floor loop end to end: watch -> unknown queued -> labeled on the page -> adapt under --adapt-when
while watch serves -> the same watch process recognizes the new class."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from edgecl.device.review import ReviewQueue, create_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


class Page:
    """One Chromium tab driven over --remote-debugging-pipe (CDP messages NUL-separated on fds 3/4)."""

    def __init__(self, tmp: Path) -> None:
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()

        def fds() -> None:  # the child reads fd 3 and writes fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-background-networking", "--disable-component-update",
                                      "--remote-debugging-pipe", f"--user-data-dir={tmp / 'chromium'}", "about:blank"],
                                     close_fds=False, preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None

    def call(self, method: str, params: dict | None = None, timeout_s: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                self._buf += os.read(self._from_chrome_r, 1 << 16)
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer
                return answer["result"]
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_chrome_w)
        os.close(self._from_chrome_r)


def _png(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def _queue_with(root: Path, n: int, tmp: Path) -> ReviewQueue:
    queue = ReviewQueue(root)
    for i in range(n):
        assert queue.add(_png(tmp / f"img{i}.png", i), {"class": "class0", "probability": 0.4, "unknown": i == 0,
                                                       "unknown_score": 1.5}, "unknown" if i == 0 else "low-confidence")
    return queue


@pytest.fixture
def review_server(tiny_bundle: Path, tmp_path: Path):
    queue = _queue_with(tmp_path / "review", 3, tmp_path / "cam")
    server = create_server(queue, tiny_bundle, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield queue, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_lists_labels_and_discards(review_server) -> None:
    queue, url = review_server
    items = json.load(urllib.request.urlopen(f"{url}/api/items"))
    assert len(items["items"]) == 3 and items["classes"] == ["class0", "class1", "class2"]
    first = items["items"][0]
    assert urllib.request.urlopen(f"{url}/image/{first['image']}").read()[:4] == b"\x89PNG"

    def post(path: str, body: dict, kind: str = "application/json") -> tuple[int, dict]:
        req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": kind})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    assert post("/api/label", {"id": first["id"], "class": "class0"}, "text/plain")[0] == 415  # not a form post
    assert post("/api/label", {"id": first["id"], "class": "../x"})[0] == 400
    assert post("/api/label", {"id": first["id"], "class": "scratch"}) == (200, {"labeled": f"labeled/scratch/{first['image']}"})
    assert post("/api/label", {"id": first["id"], "class": "scratch"})[0] == 400  # gone from the queue
    assert post("/api/discard", {"id": items["items"][1]["id"]})[0] == 200
    assert [i["id"] for i in queue.items()] == [items["items"][2]["id"]]
    assert queue.classes() == ["scratch"] and queue.labeled_count() == 1


@needs_chromium
def test_the_page_labels_with_a_new_class_and_discards(review_server, tmp_path: Path) -> None:
    queue, url = review_server
    page = Page(tmp_path)
    try:
        page.open(url + "/")
        page.wait_for("document.querySelectorAll('.item').length === 3")
        assert page.js("document.querySelector('.item .verdict').textContent") == "unknown (nearest: class0)"
        assert page.js("[...document.querySelector('.item select').options].map(o => o.value)") == \
            ["", "class0", "class1", "class2", "__new__"]
        assert page.wait_for("document.querySelector('.item img').naturalWidth") == 40  # the image loads
        page.js("""(() => { const box = document.querySelector('.item');
                   const s = box.querySelector('select'); s.value = '__new__'; s.dispatchEvent(new Event('change'));
                   const name = box.querySelector('.new-name'); name.value = 'scratch';
                   box.querySelector('button.label').click(); })()""")
        page.wait_for("document.querySelectorAll('.item').length === 2")
        page.js("document.querySelectorAll('.item button.discard')[1].click()")
        page.wait_for("document.querySelectorAll('.item').length === 1")
        page.wait_for("document.getElementById('summary').textContent.startsWith('1 to review')")
        summary = page.js("document.getElementById('summary').textContent")
        assert "1 labeled" in summary
    finally:
        page.close()
    assert queue.classes() == ["scratch"] and queue.labeled_count() == 1 and len(queue.items()) == 1


def test_cli_label_list_and_adapt_from_review(bundle_copy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgecl.cli.main import app

    queue = _queue_with(bundle_copy / "review", 2, tmp_path / "cam")
    ids = [i["id"] for i in queue.items()]
    cli = CliRunner()
    out = cli.invoke(app, ["review", str(bundle_copy), "--list", "--json"])
    assert out.exit_code == 0 and [i["id"] for i in json.loads(out.stdout)] == ids
    out = cli.invoke(app, ["adapt", str(bundle_copy), "--from-review", "--epochs", "0", "-q"])
    assert out.exit_code == 1 and "no labeled images" in out.output
    assert cli.invoke(app, ["review", str(bundle_copy), "--label", ids[0], "scratch"]).exit_code == 0
    out = cli.invoke(app, ["review", str(bundle_copy), "--label", str(_png(tmp_path / "extra.png", 9)), "scratch"])
    assert out.exit_code == 0, out.output
    assert cli.invoke(app, ["review", str(bundle_copy), "--discard", ids[1]]).exit_code == 0
    assert cli.invoke(app, ["review", str(bundle_copy), "--discard", ids[1]]).exit_code == 1
    assert queue.labeled_count() == 2 and queue.items() == []
    out = cli.invoke(app, ["adapt", str(bundle_copy), "--from-review", "--data", str(tmp_path), "-q"])
    assert out.exit_code == 1 and "pass one of them" in out.output
    out = cli.invoke(app, ["adapt", str(bundle_copy), "--from-review", "--epochs", "0", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["classes_added"] == ["scratch"]


def _rename_in(src: Path, folder: Path, name: str) -> None:
    shutil.copyfile(src, folder / f".{name}")
    os.replace(folder / f".{name}", folder / name)


def _calibrated_lda(bundle: Path, calib: Path, tmp: Path) -> None:
    import numpy as np

    from edgecl.device.adapt import adapt
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import ServingState, create_runner, resolve_profile
    from edgecl.device.plan import AdaptOptions
    from edgecl.device.state import load_current, open_bundle
    from edgecl.device.unknown import calibrate
    from edgecl.formats.images import load_image_folder

    fit, held = tmp / "fit", tmp / "held"
    for c in sorted(p.name for p in calib.iterdir()):
        files = sorted((calib / c).iterdir())
        for folder, part in ((fit, files[:10]), (held, files[10:])):
            (folder / c).mkdir(parents=True)
            for f in part:
                shutil.copyfile(f, folder / c / f.name)
    adapt(bundle, fit, AdaptOptions(epochs=0, progress=False))
    b = open_bundle(bundle)
    state = load_current(b)
    serving = ServingState.create(b, state)
    images = load_image_folder(held, b.manifest.input_size)
    scored = serving.classify(create_runner(b, resolve_profile(None, b)), b, images.pixels)
    labels = np.asarray([serving.classes.index(images.classes[i]) for i in images.labels])
    lda = LdaHead.load_file(state.lda_path)
    lda.calibration = calibrate(scored.embeddings, labels, state.prototypes.means, lda, serving.lda_means,
                                false_unknown_rate=0.1)
    # Committed as a generation of its own (the state's files are checksummed: an edit in place is refused)
    from edgecl.device.state import commit_generation

    def write(tmp: Path) -> None:
        for f in state.lda_path.parent.iterdir():
            if f.name != "meta.json":
                shutil.copyfile(f, tmp / f.name)
        lda.save_file(tmp / state.lda_path.name)

    commit_generation(b, write, {k: v for k, v in state.meta.items() if k not in ("files", "generation", "parent")})


@needs_chromium
def test_floor_loop_end_to_end(tmp_path: Path) -> None:
    """A bundle of 3 classes; the line starts showing a 4th. watch queues it as unknown, the operator
    labels it on the page, --adapt-when runs adapt while watch keeps answering, and the same watch
    process then answers the new class."""
    from conftest import MODELS, write_image_folder

    from edgecl.device.review import ReviewQueue
    from edgecl.device.watch import AdaptPolicy, Watcher, WatchOptions
    from edgecl.host.export import ExportOptions, export_bundle

    data = write_image_folder(tmp_path / "data", classes=4, per_class=14)
    calib = tmp_path / "calib"
    for c in ("class0", "class1", "class2"):
        shutil.copytree(data / c, calib / c)
    bundle = tmp_path / "bundle"
    export_bundle(MODELS / "test_efficientnet.toml", calib, bundle, options=ExportOptions(batch_size=16, progress=False))
    # The device's own LDA statistics from 10 images per class, calibrated on the other 4 (what adapt
    # commits once the integrator calls unknown.calibrate there).
    _calibrated_lda(bundle, calib, tmp_path)

    cam = tmp_path / "cam"
    cam.mkdir()
    new_images = sorted((data / "class3").iterdir())
    opts = WatchOptions(settle_s=0.0, poll_s=0.05, low_confidence=0.0)  # queue unknown images only
    watcher = Watcher(bundle, cam, opts, log=tmp_path / "watch.jsonl")
    watcher.policy = AdaptPolicy(watcher, threshold=4, extra_args=["--epochs", "0"])
    for i, src in enumerate(new_images[:4]):
        _rename_in(src, cam, f"new-{i}.png")
    watcher.run(once=True)
    queue = ReviewQueue(bundle / "review")
    assert len(queue.items()) == 4 and all(i["unknown"] and i["reason"] == "unknown" for i in queue.items())

    server = create_server(queue, bundle, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = Page(tmp_path)
    try:
        page.open(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for("document.querySelectorAll('.item').length === 4")
        for _ in range(4):
            page.js("""(() => { const box = document.querySelector('.item');
                       const s = box.querySelector('select'); s.value = '__new__'; s.dispatchEvent(new Event('change'));
                       box.querySelector('.new-name').value = 'widget'; box.querySelector('button.label').click(); })()""")
            time.sleep(0.3)
        page.wait_for("document.querySelectorAll('.item').length === 0")
    finally:
        page.close()
        server.shutdown()
        server.server_close()
    assert queue.labeled_count() == 4

    # The policy starts adapt in a child; watch answers images while it runs.
    served_during = []
    watcher.on_batch = lambda rows: served_during.append(watcher.policy.process is not None)
    for i, src in enumerate(sorted((data / "class0").iterdir())[:3]):
        _rename_in(src, cam, f"old-{i}.png")
    watcher.policy.poll()
    assert watcher.policy.process is not None
    deadline = time.monotonic() + 300
    while watcher.policy.process is not None and time.monotonic() < deadline:
        watcher.step()
        watcher.policy.poll()
        time.sleep(0.05)
    assert watcher.policy.runs and watcher.policy.runs[-1]["committed"], watcher.policy.runs
    assert served_during and served_during[0] is True  # served while the adapt ran
    for i, src in enumerate(new_images[4:8]):
        _rename_in(src, cam, f"later-{i}.png")
    watcher.run(once=True)
    lines = [json.loads(x) for x in (tmp_path / "watch.jsonl").read_text().splitlines()]
    later = [x for x in lines if x["file"].startswith("later-")]
    assert len(later) == 4 and [x["state"] for x in later] == ["gen-000003"] * 4  # export -> adapt (1) -> its calibration (2) -> the policy's adapt (3)
    assert sum(x["class"] == "widget" for x in later) >= 3
    assert (bundle / "review" / "trained").is_dir() and queue.labeled_count() == 0


def test_a_full_queue_takes_images_again_once_the_operator_empties_it(tmp_path: Path) -> None:
    from edgecl.device.review import QueueLimits

    queue = ReviewQueue(tmp_path / "review", QueueLimits(max_images=2))
    images = [_png(tmp_path / "cam" / f"{i}.png", i) for i in range(4)]
    answer = {"class": "a", "probability": 0.3, "unknown": False, "unknown_score": 0.0}
    ids = [queue.add(p, answer, "low-confidence") for p in images[:3]]
    assert ids[2] is None and queue.room_for(10) == "queue full (images)"
    queue.label(ids[0], "a")  # another process (the review page) in real life: the count is re-read
    assert queue.add(images[3], answer, "low-confidence") is not None
    assert len(queue.items()) == 2
