"""The fleet round end to end on loopback, through the real CLI: two provisioned devices adapt, delta,
push; a third, compromised device tries three poisonings (statistics with counts of 1e9: refused at
push; weights moved within bounds: refused by the gate's like-for-like check in phase 1; statistics
rolled by one class with counts it claims to have seen: refused by the gate in phase 2); excluding
it, `edgecl release` sends the candidate to the two devices, each runs `edgecl restat` (its classes'
statistics under the candidate), `edgecl release --finish` sums them, judges and publishes v2; both
devices pull it, and v2 classifies each device's data no worse than the device did; a tampered
download and a wrong signature are refused with the device's state unchanged.

The server is a real `edgecl server start` subprocess on a free 127.0.0.1 port, SQLite store in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import write_image_folder
from edgecl_test_server import free_port
from safetensors.numpy import load_file
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.mask import Mask
from edgecl.formats.scatter import RANK_DEVICE
from edgecl.formats.scatter import load_file as load_scatter

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Each device learns its OWN new classes. write_image_folder draws its c-th class with colour channel
# c % 3 and a stripe at row 7c, so drawing classes 3..6 (the names before them are placeholders,
# removed again) gives classes unlike the calibration classes 0..2 and unlike each other.
DEVICES = {"line-a": (3, ["bolt", "nut"]), "line-b": (5, ["gear", "washer"])}

# v2 can legitimately score a little lower than a device: the merge averages the elements both
# devices changed, so each device's prototypes, computed with its own backbone, meet a slightly
# different backbone in v2, which also holds the other device's classes as competitors. One image of
# each device's 20 test images; the release gate gets the same allowance per class group.
ACCURACY_TOLERANCE = 0.05


def _cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"edgecl {' '.join(args[:3])} -> {result.exit_code}: {result.output}"
    return result.output


def _credentials(out: str) -> tuple[str, str]:
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(("token ", "key ")))
    return fields["token"].strip(), fields["key"].strip()


def _classes(root: Path, first: int, names: list[str], seed: int, per_class: int) -> Path:
    placeholders = [f"_unused{i}" for i in range(first)]
    write_image_folder(root, names=placeholders + names, per_class=per_class, seed=seed)
    for name in placeholders:
        shutil.rmtree(root / name)
    return root


def provision(tmp_path: Path, tiny_bundle: Path, fleet, i: int, name: str, heldout: Path,
              *init: str) -> tuple[Path, Path, Path, Path]:
    """Device ``name`` (DEVICES' i-th): its copy of the bundle, `edgecl device init` (plus ``init``
    options), its training and test images, and its classes' images added to the release's held-out
    folder. (device bundle, config, training folder, test folder)"""
    server, _, creds, _, server_key = fleet
    first, classes = DEVICES[name]
    device = tmp_path / name / "bundle"
    shutil.copytree(tiny_bundle, device)
    config = tmp_path / name / "device.toml"
    token, key = creds[name]
    _cli("device", "init", "--server", server.url, "--name", name, "--token", token, "--key", key,
         "--server-key", server_key, "--bundle", str(device), "--config", str(config), *init)
    train = _classes(tmp_path / name / "train", first, classes, seed=10 + i, per_class=12)
    test = _classes(tmp_path / name / "test", first, classes, seed=20 + i, per_class=10)
    _classes(heldout, first, classes, seed=30 + i, per_class=6)
    return device, config, train, test


def adapt_and_delta(tmp_path: Path, name: str, i: int, device: Path, config: Path, train: Path, test: Path,
                    key: str) -> tuple[dict, Path, delta_format.Delta, str]:
    """Device ``name`` adapts (2 epochs, seed ``i``) on its training images, scores its test images (ncm)
    and writes its signed delta: (its accuracy report, the delta's path, the delta decoded with its key,
    what `edgecl delta` printed)."""
    _cli("adapt", "--config", str(config), "--data", str(train), "--epochs", "2", "--seed", str(i), "-q")
    own = json.loads(_cli("eval", str(device), "--data", str(test), "--head", "ncm", "--json"))
    path = tmp_path / name / "delta.safetensors"
    # delta (and push) take the device's name, key, server and token from its config
    out = _cli("delta", str(device), "-o", str(path), "--config", str(config))
    return own, path, delta_format.load_file(path, delta_format.parse_key(key)), out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class _Server:
    def __init__(self, store: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from edgecl.cli.main import main; main()", "server", "start", "--port",
                 str(self.port), "--store", str(store), "--log-level", "warning"],
                cwd=REPO, stdout=fh, stderr=fh, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _poisoned_delta(bundle: Path, name: str, key: str, out: Path) -> None:
    """A compromised device's delta: every masked weight moved by 5 x max|W0| of its tensor (inside
    the server's 10x bound, so it is accepted), signed with that device's real key."""
    manifest = mf.load_manifest(bundle)
    mask = Mask.load_file(bundle / mf.MASK)
    weights = load_file(bundle / mf.WEIGHTS)
    rng = np.random.default_rng(13)
    vector = np.zeros(mask.total_selected, np.float32)
    for tensor, sl in mask.slices().items():
        scale = max(float(np.abs(weights[tensor]).max()), 1e-3)
        vector[sl] = 5 * scale * rng.choice([-1.0, 1.0], sl.stop - sl.start)
    delta = delta_format.Delta.from_dense(vector, bundle_id=manifest.bundle_id, bundle_version=manifest.version,
                                          base_sha256=manifest.base_sha256, mask_sha256=manifest.mask_sha256,
                                          device_id=name, steps=10, samples_seen=64)
    delta_format.save_file(delta, out, bytes.fromhex(key))


def _statistics_poison(bundle: Path, name: str, key: str, out: Path, samples_seen: int, version: int | None = None,
                       bundle_id: str | None = None, base_sha256: str | None = None,
                       mask_sha256: str | None = None) -> None:
    """Issue 21's poisoning: no weight change, the bundle's classes' prototypes rolled by one class
    (counts 1e9) plus one class of its own, signed with the device's real key."""
    from edgecl.formats.prototypes import Prototypes

    manifest = mf.load_manifest(bundle)
    shipped = Prototypes.load_file(bundle / mf.PROTOTYPES)
    rolled = np.roll(shipped.means, 1, axis=0)
    table = Prototypes([*shipped.classes, "rivet"], np.concatenate([rolled, rolled[:1] * 0.5]),
                       np.array([10**9] * len(shipped.classes) + [12], np.int64))
    delta = delta_format.Delta.from_dense(np.zeros(manifest.selected, np.float32),
                                          bundle_id=bundle_id or manifest.bundle_id,
                                          bundle_version=version or manifest.version,
                                          base_sha256=base_sha256 or manifest.base_sha256,
                                          mask_sha256=mask_sha256 or manifest.mask_sha256, device_id=name, steps=0,
                                          samples_seen=samples_seen, prototypes=table)
    delta_format.save_file(delta, out, bytes.fromhex(key))


@pytest.fixture
def fleet(tmp_path: Path, tiny_bundle: Path):
    store = tmp_path / "store"
    creds = {name: _credentials(_cli("server", "device", "add", name, "--store", str(store)))
             for name in [*DEVICES, "line-c"]}
    admin, _ = _credentials(_cli("server", "device", "add", "ops", "--admin", "--store", str(store)))
    assert "added: bundle" in _cli("server", "bundle", "add", str(tiny_bundle), "--store", str(store))
    server_key = _cli("server", "key", "--store", str(store)).strip()
    server = _Server(store, tmp_path / "server.log")
    try:
        yield server, store, creds, admin, server_key
    finally:
        server.stop()


def test_provision_adapt_push_release_pull(tmp_path: Path, tiny_bundle: Path, fleet) -> None:
    server, store, creds, admin, server_key = fleet
    manifest = mf.load_manifest(tiny_bundle)
    own: dict[str, dict] = {}
    data: dict[str, Path] = {}
    configs: dict[str, Path] = {}
    heldout = tmp_path / "heldout"
    write_image_folder(heldout, classes=3, per_class=6, seed=99)         # the calibration classes
    for i, (name, (_, classes)) in enumerate(DEVICES.items()):
        device, configs[name], train, data[name] = provision(tmp_path, tiny_bundle, fleet, i, name, heldout,
                                                             "--outbox", str(tmp_path / name / "outbox"))
        own[name], path, d, _ = adapt_and_delta(tmp_path, name, i, device, configs[name], train, data[name],
                                                creds[name][1])
        assert d.device_id == name and set(classes) <= set(d.prototypes.classes)
        # adapt's gate measured the device on held-out images; the delta carries it. (The gate may keep
        # the backbone as it was when adapting did not help on its few held-out images: then the
        # delta changes no weight, and the fleet still gets the device's classes.)
        assert d.heldout is not None and 0 <= d.heldout["after"]["accuracy"] <= 1
        assert "sent" in _cli("push", str(path), "--config", str(configs[name]))
        assert "already there" in _cli("push", str(path), "--config", str(configs[name]))

    def push_raw(path: Path) -> httpx.Response:
        return httpx.post(server.url + "/v1/deltas", content=path.read_bytes(),
                          headers={"Authorization": f"Bearer {creds['line-c'][0]}"})

    def releases(lineage: str = manifest.bundle_id) -> list:
        return httpx.get(server.url + "/v1/releases", params={"bundle_id": lineage},
                         headers={"Authorization": f"Bearer {admin}"}).json()["releases"]

    # Poisoning 1 (issue 21): statistics rolled by one class with counts of 1e9 it never saw: refused at push.
    rolled = tmp_path / "line-c-rolled.safetensors"
    _statistics_poison(tiny_bundle, "line-c", creds["line-c"][1], rolled, samples_seen=64)
    pushed = push_raw(rolled)
    assert pushed.status_code == 422 and pushed.json()["error"] == "count_over_seen", pushed.text

    gate = ["release", str(tiny_bundle), "--heldout", str(heldout), "--server", server.url, "--token", admin,
            "--tolerance", str(ACCURACY_TOLERANCE)]

    def round_(*extra: str, answer: tuple[str, ...] = tuple(DEVICES)):
        """Phase 1; the honest devices send their statistics; phase 2. The last CLI result."""
        first = runner.invoke(app, [*gate, *extra])
        if first.exit_code != 0:
            return first
        for name in answer:
            assert json.loads(_cli("restat", "--config", str(configs[name]), "--json"))["status"] == "sent"
        return runner.invoke(app, [*gate, *extra, "--finish"])

    # Poisoning 2: weights moved within every format and bound check: accepted at push; the round
    # publishes nothing (the current classes or a device's, like for like, are worse).
    poisoned = tmp_path / "line-c.safetensors"
    _poisoned_delta(tiny_bundle, "line-c", creds["line-c"][1], poisoned)
    assert push_raw(poisoned).status_code == 201
    refused = round_()
    assert refused.exit_code == 2, refused.output
    assert "release refused, nothing published: " in refused.stderr, refused.stderr
    # 6 held-out images a class: the release says its groups were judged on too few images
    assert "note: a group is judged on few held-out images here: " in refused.stderr, refused.stderr
    assert releases() == []
    assert _cli("pull", "--config", str(configs["line-a"])).startswith("up to date")   # never a candidate

    # Poisoning 3: the same statistics claiming as many images as they count (samples_seen 1e9): taken
    # at push; phase 1 never reads a device's numbers for the current classes, and when line-c sends
    # them again under the candidate (where a device may update classes it saw), the same-classes
    # comparison refuses in phase 2. Nothing is published.
    _statistics_poison(tiny_bundle, "line-c", creds["line-c"][1], rolled, samples_seen=10**9)
    assert push_raw(rolled).status_code == 201
    out = _cli(*gate)
    assert "sent to line-a, line-b, line-c" in out, out
    candidate = httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": f"{manifest.bundle_id}.candidate"},
                          headers={"Authorization": f"Bearer {creds['line-c'][0]}"}).json()
    assert candidate["report"]["version"] == 2
    cand_manifest = httpx.get(server.url + f"/v1/bundles/{candidate['bundle_id']}/{candidate['version']}"
                              "/files/manifest.json", headers={"Authorization": f"Bearer {admin}"}).json()
    _statistics_poison(tiny_bundle, "line-c", creds["line-c"][1], rolled, samples_seen=10**9,
                       version=candidate["version"], bundle_id=candidate["bundle_id"],
                       base_sha256=cand_manifest["base_sha256"], mask_sha256=cand_manifest["mask_sha256"])
    pushed = push_raw(rolled)
    assert pushed.status_code == 201, pushed.text
    # By default a device's rows of the current classes are not read at all (--update-known is off), so
    # the rolled statistics change nothing: judged only, the candidate's current classes are v1's own.
    ignored = runner.invoke(app, [*gate, "--finish", "--no-publish", "--json"])
    judged = json.loads(ignored.stdout[ignored.stdout.index("{"):])
    assert judged["statistics"]["line-c"]["answered"], judged
    assert judged["groups"]["calibration"]["candidate_current_classes"] >= \
        judged["groups"]["calibration"]["current"] - ACCURACY_TOLERANCE, judged["groups"]
    # With --update-known they are summed in, and the same-classes comparison refuses them.
    refused = runner.invoke(app, [*gate, "--finish", "--update-known"])
    assert refused.exit_code == 2, refused.output
    assert "calibration: candidate on the current classes" in refused.stderr, refused.stderr
    assert releases() == []

    # The operator excludes the compromised device: phase 1 sends the honest candidate to line-a and
    # line-b; each sends its classes' statistics under it (kilobytes, no weight); phase 2 publishes v2.
    out = _cli(*gate, "--exclude-device", "line-c")
    assert "candidate v2 sent to line-a, line-b " in out, out
    assert _cli("pull", "--config", str(configs["line-a"])).startswith("up to date")   # never the candidate
    for name, (_, classes) in DEVICES.items():
        sent = json.loads(_cli("restat", "--config", str(configs[name]), "--json"))
        assert sent["status"] == "sent" and set(sent["classes"]) == set(classes), sent
        # kilobytes: means and counts, and two rank-16 float16 scatter factors (candidate, current backbone)
        scatter_bytes = 2 * 2 * manifest.embedding_dim * RANK_DEVICE
        assert all(n >= 12 for n in sent["classes"].values()) and sent["delta_bytes"] < 20_000 + scatter_bytes, sent
    # --class-data (images of v1's classes): with them and every device's scatter, the gate judges with the
    # LDA head, the one the devices serve, and v2 ships the pooled scatter it was judged with.
    class_data = tmp_path / "class-data"
    write_image_folder(class_data, classes=3, per_class=8, seed=7)
    out = _cli(*gate, "--finish", "--json", "--class-data", str(class_data))
    finished = json.loads(out[out.index("{"):])
    assert finished["published"] and finished["not_judged"] == [], finished
    assert finished["head"]["name"] == "lda", finished["head"]
    assert all(finished["statistics"][n]["answered"] for n in DEVICES)
    calibration = finished["groups"]["calibration"]
    assert calibration["candidate_current_classes"] >= calibration["current"] - ACCURACY_TOLERANCE
    assert [(r["bundle_id"], r["version"]) for r in releases()] == [(manifest.bundle_id, 2)]
    v2_row = httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": manifest.bundle_id},
                       headers={"Authorization": f"Bearer {admin}"}).json()
    assert v2_row["report"]["statistics"]["line-a"]["classes"] == DEVICES["line-a"][1]
    v2_manifest = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/manifest.json",
                            headers={"Authorization": f"Bearer {admin}"}).json()
    assert "rivet" not in v2_manifest["classes"] and mf.FLEET_SCATTER in v2_manifest["files"]

    # line-b first meets a wrong signature (a config pinning another key) and a tampered file:
    # both refused, its bundle and state exactly as they were.
    device_b = tmp_path / "line-b" / "bundle"
    before = _tree(device_b)
    wrong = runner.invoke(app, ["pull", "--config", str(configs["line-b"]), "--server-key", "ab" * 32])
    assert wrong.exit_code == 1 and "does not verify with the pinned server key" in wrong.output, wrong.output
    info = httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": manifest.bundle_id},
                     headers={"Authorization": f"Bearer {creds['line-b'][0]}"}).json()
    # The prototypes travel whole (the weights come as the release's patch, checked after applying).
    blob = store / "blobs" / info["files"][mf.PROTOTYPES]["sha256"][:2] / info["files"][mf.PROTOTYPES]["sha256"]
    original = blob.read_bytes()
    blob.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    try:
        tampered = runner.invoke(app, ["pull", "--config", str(configs["line-b"])])
        # the server re-hashes blobs before serving them (store_damaged); the device's own check
        # ("hashes to") refuses what is altered after that
        assert tampered.exit_code == 1 and ("store_damaged" in tampered.output or "hashes to" in tampered.output), \
            tampered.output
    finally:
        blob.write_bytes(original)
    assert _tree(device_b) == before and sorted(p.name for p in device_b.parent.iterdir()) == sorted(
        ["bundle", "train", "test", "device.toml", "delta.safetensors"])

    # Both devices pull v2 and upgrade; v2 classifies each device's data no worse than the device did.
    for name in DEVICES:
        report = json.loads(_cli("pull", "--config", str(configs[name]), "--json"))
        assert report["status"] == "upgraded" and report["version"] == 2, report
        # v2 ships this device's classes (their statistics from its own restat): pull judged them
        # against the device's own on the images it holds, kept the better, and says which
        chose = report["upgrade"]["chose"]
        assert chose["kept"] in ("released", "device") and chose["images"] > 0, chose
        assert set(chose["classes"]) == set(DEVICES[name][1]), chose
        new = Path(report["bundle_dir"])
        assert mf.load_manifest(new).version == 2 and (new / "state" / "HEAD.json").exists()
        # the device serves v2 with the LDA head the gate judged: the fleet's pooled scatter, calibrated by
        # the release on its held-out images (an unknown threshold and temperatures, not softmax at T = 1)
        assert report["upgrade"]["lda_from_release"] is True, report["upgrade"]
        _, _, calibration = load_scatter(new / mf.FLEET_SCATTER, manifest.embedding_dim)
        assert calibration is not None and calibration["score"] == "relative-mahalanobis", calibration
        assert calibration["temperature"]["lda"] > 0 and calibration["fitted_by"].startswith("edgecl release")
        served = json.loads(_cli("predict", str(new), str(next((data[name] / DEVICES[name][1][0]).iterdir())),
                                 "--json"))
        assert served[0]["head"] == "lda" and served[0]["unknown"] is not None, served
        # a fresh install of v2 (no device state of its own) serves the same head from the bundle's file
        fresh = tmp_path / f"{name}-fresh-v2"
        shutil.copytree(new, fresh, ignore=shutil.ignore_patterns("state"))
        assert json.loads(_cli("eval", str(fresh), "--data", str(data[name]), "--json"))["head"] == "lda"
        print(f"{name}: downlink {report['downloaded_bytes']:,} B of {report['total_bytes']:,} B "
              f"(per file {report['wire_bytes']}; reused {report['copied']})")
        got = json.loads(_cli("eval", str(new), "--data", str(data[name]), "--head", "ncm", "--json"))
        print(f"{name}: device {own[name]['accuracy']:.3f}  v2 {got['accuracy']:.3f}")
        assert got["accuracy"] >= own[name]["accuracy"] - ACCURACY_TOLERANCE, (name, own[name], got)
        assert _cli("pull", "--config", str(configs[name])).startswith("up to date")
    # A device on v2 goes on: the server knows v2 (the gate stored it), so its next delta is accepted.
    from edgecl.device.provision import load_device_config

    v2_device = Path(load_device_config(configs["line-a"]).bundle)      # pull moved the config on
    assert v2_device.name == "bundle.v2"
    # A round after a release, default mode: v2 knows line-a's and line-b's classes, whose images stayed
    # on those devices (v2 ships exemplars of v1's classes only; --class-data covers v1's). line-a adapts
    # again on v2 and pushes; line-b sends nothing. Phase 1 asks both to place their classes under the
    # candidate (line-a reports its classes; v2's release counted line-b's from line-b), holding the
    # host's drift estimate of them until then, not judged; their answers replace those classes'
    # statistics on both sides, and every class has its scatter, so the gate judges with LDA.
    _cli("adapt", "--config", str(configs["line-a"]), "--data", str(data["line-a"]), "--epochs", "1", "-q")
    again = tmp_path / "line-a" / "delta-round2.safetensors"
    _cli("delta", str(v2_device), "-o", str(again), "--config", str(configs["line-a"]))
    assert "sent" in _cli("push", str(again), "--config", str(configs["line-a"]))
    device_classes = [c for _, classes in DEVICES.values() for c in classes]
    out = _cli(*gate, "--class-data", str(class_data))
    assert "candidate v3 sent to line-a, line-b " in out, out
    assert f"the current classes {', '.join(device_classes)} (added by devices in earlier rounds" in out, out
    for name, (_, classes) in DEVICES.items():
        sent = json.loads(_cli("restat", "--config", str(configs[name]), "--json"))
        assert sent["status"] == "sent" and set(sent["classes"]) == set(classes), sent
    # (judged only: passed or refused by a tiny model's accuracy, the statistics are what this checks)
    result = runner.invoke(app, [*gate, "--finish", "--no-publish", "--json", "--class-data", str(class_data)])
    assert result.exit_code in (0, 2), result.output
    judged = json.loads(result.stdout[result.stdout.index("{"):])
    assert judged["estimated"] == [] and judged["head"]["name"] == "lda", judged
    assert {n: sorted(judged["statistics"][n]["classes"]) for n in DEVICES} == \
        {n: sorted(c) for n, (_, c) in DEVICES.items()}, judged["statistics"]
    assert releases()[-1]["version"] == 2                                # judged only
    _cli("adapt", str(v2_device), "--data", str(data["line-a"]), "--epochs", "0", "-q")
    path = tmp_path / "line-a" / "delta-v2.safetensors"
    _cli("delta", str(v2_device), "-o", str(path), "--config", str(configs["line-a"]))
    assert delta_format.read_header(path).bundle_version == 2
    assert "sent" in _cli("push", str(path), "--config", str(configs["line-a"]))
    listed = {d["name"]: d for d in httpx.get(server.url + "/v1/devices",
                                             headers={"Authorization": f"Bearer {admin}"}).json()["devices"]}
    # (line-b's last push was its statistics answer to the round-2 candidate, another lineage's version)
    assert listed["line-a"]["last_version"] == 2 and all(listed[n]["last_heldout"]["after"] for n in DEVICES), \
        {n: (listed[n]["last_version"], str(listed[n]["last_heldout"])[:80]) for n in DEVICES}
    # One phase (--no-statistics-round): line-a's delta moves no weight and adds no class, so v3 is v2 as
    # it is: judged at once (nothing to wait for) and published.
    out = _cli("release", str(v2_device), "--heldout", str(heldout), "--server", server.url, "--token", admin,
               "--no-statistics-round")
    assert f"released {manifest.bundle_id} v3" in out, out
