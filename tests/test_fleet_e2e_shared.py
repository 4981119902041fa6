"""The fleet round's second mode, "exemplars shared" (issue 21), end to end on loopback through the
real CLI, the real server (`edgecl server start` subprocess) and real onnxruntime: two devices whose
profile says ``share_exemplars = true`` adapt on their own classes and push deltas carrying their
stored exemplars of them; `edgecl release` embeds those images under the candidate, computes their
classes' statistics exactly and publishes v2 at once (no `edgecl restat`); v2 ships both devices'
exemplars (listed and hashed in its manifest); a device pulls it and its next adaptation replays the
other device's classes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
from conftest import write_image_folder
from test_fleet_e2e import (  # noqa: F401 (fleet: the fixture)
    ACCURACY_TOLERANCE,
    DEVICES,
    _classes,
    _cli,
    adapt_and_delta,
    fleet,
    provision,
)

from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.exemplars import ExemplarMemory


def test_exemplars_shared_round_publishes_without_restat_and_devices_replay_the_fleet(
        tmp_path: Path, tiny_bundle: Path, fleet) -> None:  # noqa: F811 (the fixture)
    server, store, creds, admin, server_key = fleet
    manifest = mf.load_manifest(tiny_bundle)
    profile = tmp_path / "sharing.toml"
    profile.write_text('name = "sharing"\nstore_images = true\nexemplar_budget_mb = 16\nshare_exemplars = true\n')
    configs: dict[str, Path] = {}
    data: dict[str, Path] = {}
    own: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    shared_images = 0
    shared_per_device: dict[str, int] = {}
    heldout = tmp_path / "heldout"
    write_image_folder(heldout, classes=3, per_class=6, seed=99)         # the calibration classes
    for i, (name, (_, classes)) in enumerate(DEVICES.items()):
        device, configs[name], train, data[name] = provision(tmp_path, tiny_bundle, fleet, i, name, heldout,
                                                             "--profile", str(profile))
        own[name], path, d, out = adapt_and_delta(tmp_path, name, i, device, configs[name], train, data[name],
                                                  creds[name][1])
        # its own classes' stored exemplars only, bounded by what it counted, and their size reported
        assert d.exemplars is not None and sorted(d.exemplars.classes) == sorted(classes), d.exemplars.classes
        header = delta_format.read_header(path)
        assert header.metadata["format_version"] == "4"
        assert f"shares {len(d.exemplars.labels)} exemplar images of 2 class(es): {header.exemplar_bytes:,} B" in out
        sizes[name] = path.stat().st_size
        shared_images += len(d.exemplars.labels)
        shared_per_device[name] = len(d.exemplars.labels)
        print(f"{name}: delta {sizes[name]:,} B, of which shared exemplars {header.exemplar_bytes:,} B "
              f"({len(d.exemplars.labels)} images)")
        assert "sent" in _cli("push", str(path), "--config", str(configs[name]))

    # One command: the host embeds the shared images under the candidate and the current version; every
    # device class is exact, so no device has to answer `edgecl restat`: v2 is judged by the full gate,
    # with the LDA head the devices serve (the shared images give their classes' scatter under both
    # backbones, --class-data the calibration classes'), and published now. --no-publish first: the
    # same judgement, nothing released.
    gate = ["release", str(tiny_bundle), "--heldout", str(heldout), "--class-data", str(heldout), "--server",
            server.url, "--token", admin, "--tolerance", str(ACCURACY_TOLERANCE), "--exclude-device", "line-c"]
    admin_h = {"Authorization": f"Bearer {admin}"}

    def releases() -> list[tuple[str, int]]:
        rows = httpx.get(server.url + "/v1/releases", params={"bundle_id": manifest.bundle_id},
                         headers=admin_h).json()["releases"]
        return [(r["bundle_id"], r["version"]) for r in rows]

    judged = _cli(*gate, "--no-publish", "--consolidate", "0", "--work", str(tmp_path / "plain"))
    assert "judged only (--no-publish): v2 passes; nothing published" in judged, judged
    assert releases() == []
    # --consolidate: the merged delta trained further on the fleet's exemplars of every class (the
    # bundle's calibration exemplars and both devices' shared ones) before it is judged; a real run of
    # the step graph, so the candidate's weights differ from the plain merge's.
    out = _cli(*gate, "--no-publish", "--consolidate", "2", "--work", str(tmp_path / "consolidated"), "--json")
    consolidated = json.loads(out[out.index("{"):])
    c = consolidated["consolidation"]
    version_exemplars = ExemplarMemory.load_file(tiny_bundle / mf.EXEMPLARS)
    assert c["epochs"] == 2 and c["steps"] > 0 and c["images"] == len(version_exemplars.labels) + shared_images, c
    assert set(manifest.classes) | {x for _, cs in DEVICES.values() for x in cs} <= set(c["classes"]), c
    assert c["first_loss"] > 0 and c["last_loss"] > 0 and c["moved"] > 0, c
    assert consolidated["head"]["name"] == "lda" and not consolidated["published"], consolidated
    weights = [(tmp_path / w / "candidate" / mf.WEIGHTS).read_bytes() for w in ("plain", "consolidated")]
    assert weights[0] != weights[1]
    assert releases() == []
    out = _cli(*gate, "--json")
    report = json.loads(out[out.index("{"):])
    assert report["published"] and report["stage"] == "released" and report["not_judged"] == [], report
    # by default a round whose every class has exemplars is consolidated (release.DEFAULT_CONSOLIDATE_EPOCHS)
    assert report["consolidation"]["epochs"] == 10 and report["consolidation"]["images"] == c["images"], report
    assert report["head"]["name"] == "lda", report["head"]
    for name, (_, classes) in DEVICES.items():
        row = report["statistics"][name]
        assert row["source"] == "shared exemplars" and sorted(row["classes"]) == sorted(classes), row
        assert report["groups"][f"device:{name}"]["judged"], report["groups"]
    assert releases() == [(manifest.bundle_id, 2)]
    # v2 ships the fleet's exemplars: the calibration classes' and both devices', listed and hashed.
    v2 = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/manifest.json", headers=admin_h).json()
    shipped_bytes = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/{mf.EXEMPLARS}",
                              headers=admin_h).content
    assert v2["files"][mf.EXEMPLARS] == hashlib.sha256(shipped_bytes).hexdigest()
    shipped = ExemplarMemory.from_bytes(shipped_bytes)
    fleet_classes = [c for _, cs in DEVICES.values() for c in cs]
    assert set(manifest.classes) | set(fleet_classes) <= set(shipped.classes), shipped.classes
    assert set(fleet_classes) <= set(v2["classes"])
    assert mf.FLEET_SCATTER in v2["files"]          # the head it was judged with ships with it

    # Both devices pull v2; it classifies each device's data no worse than the device did.
    for name in DEVICES:
        pulled = json.loads(_cli("pull", "--config", str(configs[name]), "--json"))
        assert pulled["status"] == "upgraded" and pulled["version"] == 2, pulled
        # v2's statistics of the device's classes came from the exemplars it shared: the pull judges
        # them against its own, recomputed under v2 from every image it holds, and says which it kept
        chose = pulled["upgrade"]["chose"]
        assert sorted(chose["recomputed"]) == sorted(DEVICES[name][1]) == sorted(chose["classes"]), chose
        assert chose["kept"] in ("released", "device") and chose["images"] >= shared_per_device[name], chose
        assert (chose["kept"] == "device") == (chose["device_accuracy"] > chose["released_accuracy"]), chose
        got = json.loads(_cli("eval", pulled["bundle_dir"], "--data", str(data[name]), "--head", "ncm", "--json"))
        print(f"{name}: device {own[name]['accuracy']:.3f}  v2 {got['accuracy']:.3f}")
        assert got["accuracy"] >= own[name]["accuracy"] - ACCURACY_TOLERANCE, (name, own[name], got)

    # line-a's next adaptation (new images of its own classes) replays line-b's classes from v2's exemplars.
    more = _classes(tmp_path / "line-a" / "more", DEVICES["line-a"][0], DEVICES["line-a"][1], seed=40, per_class=8)
    out = _cli("adapt", "--config", str(configs["line-a"]), "--data", str(more), "--epochs", "1", "--json")
    adapted = json.loads(out[out.index("{"):])
    replayed = adapted["replayed_classes"]
    for other in DEVICES["line-b"][1]:
        assert replayed.get(other, 0) > 0, replayed


def _adapt_and_push(tmp_path: Path, tiny_bundle: Path, fleet, sharing_devices: set[str]  # noqa: ANN001, F811
                    ) -> tuple[dict[str, Path], Path]:
    """Every device of DEVICES provisioned (those in ``sharing_devices`` with ``share_exemplars =
    true``), adapted 2 epochs on its classes, its delta pushed; returns their configs and the held-out
    images of the calibration classes."""
    sharing = tmp_path / "sharing.toml"
    sharing.write_text('name = "sharing"\nstore_images = true\nshare_exemplars = true\n')
    configs: dict[str, Path] = {}
    heldout = tmp_path / "heldout"
    write_image_folder(heldout, classes=3, per_class=6, seed=99)
    for i, name in enumerate(DEVICES):
        device, configs[name], train, _ = provision(tmp_path, tiny_bundle, fleet, i, name, heldout,
                                                    *(["--profile", str(sharing)] if name in sharing_devices else []))
        _cli("adapt", "--config", str(configs[name]), "--data", str(train), "--epochs", "2", "--seed", str(i), "-q")
        path = tmp_path / name / "delta.safetensors"
        _cli("delta", str(device), "-o", str(path), "--config", str(configs[name]))
        assert (delta_format.load_file(path).exemplars is not None) == (name in sharing_devices)
        assert "sent" in _cli("push", str(path), "--config", str(configs[name]))
    return configs, heldout


def test_a_mixed_round_waits_only_for_the_devices_that_keep_their_images(tmp_path: Path, tiny_bundle: Path,
                                                                          fleet) -> None:  # noqa: F811
    """line-a shares its exemplars, line-b keeps its images (the default profile): phase 1 sends the
    candidate; only line-b answers `edgecl restat`; --finish takes line-a's classes from its shared images
    (exact under the candidate) and line-b's from its answer, judges both and publishes."""
    server, store, creds, admin, server_key = fleet
    manifest = mf.load_manifest(tiny_bundle)
    configs, heldout = _adapt_and_push(tmp_path, tiny_bundle, fleet, {"line-a"})
    gate = ["release", str(tiny_bundle), "--heldout", str(heldout), "--server", server.url, "--token", admin,
            "--tolerance", str(ACCURACY_TOLERANCE), "--exclude-device", "line-c"]
    # consolidation needs exemplars of every class: line-b keeps its images, so it is refused, naming them
    refused = _cli(*gate, "--consolidate", "1", code=1)
    assert "--consolidate needs exemplars of every class; none of " + ", ".join(DEVICES["line-b"][1]) in refused, refused
    out = _cli(*gate, "--json")
    first = json.loads(out[out.index("{"):])
    assert first["stage"] == "candidate" and first["not_judged"] == ["device:line-b"], first
    assert first["consolidation"] is None                # line-b's classes have no exemplar: not by default
    assert first["statistics"]["line-a"]["source"] == "shared exemplars"
    sent = json.loads(_cli("restat", "--config", str(configs["line-b"]), "--json"))
    assert sent["status"] == "sent", sent
    # --wait-s waits for line-b only (it answered): line-a, covered by its shared images, is never waited for,
    # so --finish returns long before the 600 s a missing answer would hold it
    started = time.monotonic()
    out = _cli(*gate, "--finish", "--wait-s", "600", "--json")
    assert time.monotonic() - started < 400
    finished = json.loads(out[out.index("{"):])
    assert finished["published"] and finished["not_judged"] == [], finished
    assert finished["statistics"]["line-a"]["source"] == "shared exemplars", finished["statistics"]
    assert finished["statistics"]["line-b"]["answered"], finished["statistics"]
    admin_h = {"Authorization": f"Bearer {admin}"}
    v2 = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/manifest.json", headers=admin_h).json()
    assert set(DEVICES["line-a"][1]) | set(DEVICES["line-b"][1]) <= set(v2["classes"])
    shipped = ExemplarMemory.from_bytes(httpx.get(
        server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/{mf.EXEMPLARS}", headers=admin_h).content)
    # only the images line-a shared travel: line-b's stay on line-b
    assert set(DEVICES["line-a"][1]) <= set(shipped.classes) and not set(DEVICES["line-b"][1]) & set(shipped.classes)


def test_ask_shared_consolidates_then_asks_every_device_for_the_statistics_of_all_its_images(
        tmp_path: Path, tiny_bundle: Path, fleet) -> None:  # noqa: F811
    """Both devices share their exemplars; `--ask-shared`: phase 1 consolidates the merged step on the
    fleet's exemplars and sends that candidate; both answer `edgecl restat` (every image they hold);
    --finish judges with their answers and publishes weights that are the candidate's, pulled as the
    consolidated step's own patch (phase 2 repeats the consolidation bit for bit)."""
    server, store, creds, admin, server_key = fleet
    manifest = mf.load_manifest(tiny_bundle)
    configs, heldout = _adapt_and_push(tmp_path, tiny_bundle, fleet, set(DEVICES))
    gate = ["release", str(tiny_bundle), "--heldout", str(heldout), "--class-data", str(heldout), "--server",
            server.url, "--token", admin, "--tolerance", str(ACCURACY_TOLERANCE), "--exclude-device", "line-c",
            "--work", str(tmp_path / "work")]
    out = _cli(*gate, "--ask-shared", "--consolidate", "2", "--json")
    first = json.loads(out[out.index("{"):])
    assert first["stage"] == "candidate" and first["consolidation"]["epochs"] == 2, first
    assert sorted(first["not_judged"]) == [f"device:{d}" for d in sorted(DEVICES)], first
    for name in DEVICES:
        sent = json.loads(_cli("restat", "--config", str(configs[name]), "--json"))
        assert sent["status"] == "sent", sent
    out = _cli(*gate, "--finish", "--json")
    finished = json.loads(out[out.index("{"):])
    assert finished["published"] and finished["not_judged"] == [], finished
    assert finished["consolidation"] == first["consolidation"], finished["consolidation"]
    for name in DEVICES:
        assert finished["statistics"][name]["answered"], finished["statistics"]
    admin_h = {"Authorization": f"Bearer {admin}"}
    v2 = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/manifest.json", headers=admin_h).json()
    released = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/{mf.WEIGHTS}", headers=admin_h).content
    assert released == (tmp_path / "work" / "statistics-candidate" / mf.WEIGHTS).read_bytes()
    # the consolidation repeated in phase 2 gave the same step: the devices pull it as the step's patch
    patch_name = v2["weights_patches"][hashlib.sha256((tiny_bundle / mf.WEIGHTS).read_bytes()).hexdigest()]
    patch = httpx.get(server.url + f"/v1/bundles/{manifest.bundle_id}/2/files/{patch_name}", headers=admin_h).content
    from edgecl.formats.weights_patch import MODE_STEP, read_header
    assert read_header(patch)["mode"] == MODE_STEP
    for name in DEVICES:
        pulled = json.loads(_cli("pull", "--config", str(configs[name]), "--json"))
        assert pulled["status"] == "upgraded" and pulled["version"] == 2, pulled
