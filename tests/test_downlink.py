"""The downlink in kilobytes, and what it refuses (issue 22).

Real parts: the tiny bundle exported through the host path, a real `edgecl server` on loopback, and,
for answers no honest server gives (endless bodies, malformed JSON), a plain HTTP server on loopback
that says exactly those bytes. Disk failures are real kernel errors (/dev/full, a tmpfs in a user
namespace), not simulated ones.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_pull import _device, _next_version, _tree, serve_release

from edgecl.device.pull import pull
from edgecl.errors import EdgeclError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.mask import Mask
from edgecl.formats.overlap import OverlapHistory
from edgecl.formats.signing import generate_private_key, manifest_object, public_key, sign_manifest
from edgecl.formats.weights import load_weights, weights_to_bytes
from edgecl.formats.weights_patch import (
    STEP_BLOCK,
    PatchError,
    apply_patch,
    attach_weights_patch,
    make_patch,
    make_step_patch,
    patched_mask,
    quantize_step,
    read_header,
    released_delta,
)
from edgecl.http_client import DiskError, MalformedAnswer, RetryPolicy, download
from edgecl.server.service import release_version
from edgecl.server.store import add_bundle_dir

FAST = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.02, timeout_s=10)


# -- the weights patch: format and properties ------------------------------------------------------------
def test_patch_round_trip_changes_only_what_moved() -> None:
    rng = np.random.default_rng(0)
    old = rng.standard_normal(100_000).astype(np.float32)
    new = old.copy()
    moved = rng.choice(old.size, 2_000, replace=False)
    new[moved] += rng.normal(0, 1e-3, moved.size).astype(np.float32)
    patch = make_patch(old.tobytes(), new.tobytes())
    assert patch is not None and apply_patch(old.tobytes(), patch) == new.tobytes()
    assert len(patch) < 5 * moved.size, len(patch)               # a few bytes per moved value, not 400 kB
    same = make_patch(old.tobytes(), old.tobytes())
    assert same is not None and len(same) < 300 and apply_patch(old.tobytes(), same) == old.tobytes()
    assert make_patch(old.tobytes(), new.tobytes()[:-4]) is None   # another layout: no word-for-word patch
    assert read_header(patch)["mode"] == "add"                   # float steps: old + step is new, bit for bit
    odd = bytearray(new.tobytes())
    odd[:4] = b"\x01\x00\xc0\x7f"                                 # a NaN: no float step reproduces it
    xor = make_patch(old.tobytes(), bytes(odd))
    assert xor is not None and read_header(xor)["mode"] == "xor" and apply_patch(old.tobytes(), xor) == bytes(odd)


def test_patch_refuses_another_base_and_damage() -> None:
    rng = np.random.default_rng(1)
    old = rng.standard_normal(5_000).astype(np.float32).tobytes()
    new = bytearray(old)
    new[400:404] = b"\x01\x02\x03\x04"
    patch = make_patch(old, bytes(new))
    assert patch is not None
    with pytest.raises(PatchError, match="another weights file"):
        apply_patch(bytes(new), patch)
    with pytest.raises(PatchError, match="ECLPATCH"):
        apply_patch(old, b"junk" + patch)
    for cut in (len(patch) - 3, 40):
        with pytest.raises(PatchError):
            apply_patch(old, patch[:cut])
    flipped = bytearray(patch)
    flipped[-6] ^= 0x40
    with pytest.raises(PatchError):
        apply_patch(old, bytes(flipped))


# -- a release pulled in kilobytes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patched(tiny_bundle, tmp_path_factory):
    """v2 = 2% of v1's weights moved + a class, a host-only file (server_files), and the release's
    weights patch against v1; stored and released on a real server."""
    root = tmp_path_factory.mktemp("downlink")
    v2 = _next_version(tiny_bundle, root / "v2", move_weights=0.02)
    manifest = json.loads((v2 / mf.MANIFEST).read_text())
    (v2 / mf.RECIPE_WEIGHTS).write_bytes(b"host-side weights in the recipe's layout" * 1000)
    manifest["server_files"] = {mf.RECIPE_WEIGHTS: hashlib.sha256((v2 / mf.RECIPE_WEIGHTS).read_bytes()).hexdigest()}
    manifest["sizes"][mf.RECIPE_WEIGHTS] = (v2 / mf.RECIPE_WEIGHTS).stat().st_size
    (v2 / mf.MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
    name = attach_weights_patch(v2, tiny_bundle / mf.WEIGHTS)
    assert name is not None and name in mf.load_manifest(v2).server_files
    for served in serve_release(root / "store", tiny_bundle, v2, ["cam-1"]):
        yield {**served, "token": served["creds"]["cam-1"][0], "v2": v2, "patch": name}


def test_device_pulls_only_its_files_and_the_weights_as_the_release_patch(patched, tiny_bundle, tmp_path):
    old = _device(tiny_bundle, tmp_path)
    report = pull(old, patched["server"].url, patched["token"], patched["public"], policy=FAST)
    new = Path(report.bundle_dir)
    assert report.patched == [mf.WEIGHTS]
    assert sorted(report.downloaded) == [mf.MANIFEST, mf.PROTOTYPES, mf.WEIGHTS]
    assert mf.TRAIN_STEP in report.copied and mf.INFERENCE_MODEL in report.copied
    patch_size = (patched["v2"] / patched["patch"]).stat().st_size
    assert report.wire_bytes[mf.WEIGHTS] <= patch_size + 64
    assert not (new / mf.RECIPE_WEIGHTS).exists() and not (new / patched["patch"]).exists()
    # The class table gained a class (another size): zlib with the device's table as dictionary, so
    # the rows it already holds cost a back-reference each.
    table = (patched["v2"] / mf.PROTOTYPES).read_bytes()
    assert report.wire_bytes[mf.PROTOTYPES] < len(zlib.compress(table, 9)) / 2, report.wire_bytes
    device_files = {k: v for k, v in _tree(new).items() if not k.startswith("state")}
    assert device_files == {k: v for k, v in _tree(patched["v2"]).items()
                            if k not in (mf.RECIPE_WEIGHTS, patched["patch"])}
    print(f"downlink {report.downloaded_bytes:,} B ({report.wire_bytes}); weights patch {patch_size:,} B")


def test_a_damaged_patch_falls_back_to_the_whole_file(patched, tiny_bundle, tmp_path):
    store = patched["store"]
    blob = store.blob_path(store.bundle_files(patched["bundle_id"], 2)[patched["patch"]]["sha256"])
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        report = pull(_device(tiny_bundle, tmp_path), patched["server"].url, patched["token"], patched["public"],
                      policy=FAST)
    finally:
        blob.write_bytes(original)
    assert report.patched == [] and mf.WEIGHTS in report.downloaded
    assert (Path(report.bundle_dir) / mf.WEIGHTS).read_bytes() == (patched["v2"] / mf.WEIGHTS).read_bytes()



# -- the release's own step (format version 2): positions against the device's mask, int4 values ---------
def _merged(bundle: Path, share: float = 0.4, seed: int = 2) -> tuple[delta_format.Delta, Mask]:
    """A merged delta over the bundle's mask as the server writes one: fp32, ``share`` of K moved."""
    manifest, mask = mf.load_manifest(bundle), Mask.load_file(bundle / mf.MASK)
    rng = np.random.default_rng(seed)
    vector = np.where(rng.random(mask.total_selected) < share,
                      rng.normal(0, 2e-3, mask.total_selected), 0).astype(np.float32)
    return delta_format.Delta.from_dense(vector, bundle_id=manifest.bundle_id, bundle_version=manifest.version,
                                         base_sha256=manifest.base_sha256, mask_sha256=manifest.mask_sha256,
                                         device_id=delta_format.MERGE_DEVICE_ID, samples_seen=100), mask


def _stepped_weights(bundle: Path, vector: np.ndarray, mask: Mask) -> bytes:
    """The weights the host's apply writes for ``vector`` (mask.scatter, canonical bytes)."""
    base = load_weights(bundle / mf.WEIGHTS)
    return weights_to_bytes({**base, **mask.scatter(vector, base)})


def test_step_patch_is_the_release_rule_bit_for_bit_and_gives_the_next_mask(tiny_bundle) -> None:
    merged, mask = _merged(tiny_bundle)
    k = mask.total_selected
    step = quantize_step(merged.to_dense(k))
    released = released_delta(merged, step).to_dense(k)
    # int4 in blocks of 64 moved values: each value within half a step of the merged one, the zeros kept.
    scale = np.zeros(k, np.float32)
    scale[step.support] = np.repeat(step.scales, STEP_BLOCK)[:int(step.support.sum())]
    assert np.all(np.abs(released - merged.to_dense(k)) <= scale / 2 + 1e-12)
    assert not np.any(released[merged.to_dense(k) == 0])
    old, new, mask_bytes = (tiny_bundle / mf.WEIGHTS).read_bytes(), _stepped_weights(tiny_bundle, released, mask), \
        (tiny_bundle / mf.MASK).read_bytes()
    patch = make_step_patch(old, new, mask_bytes, step)
    assert patch is not None and read_header(patch)["format_version"] == 2
    assert apply_patch(old, patch, mask_bytes) == new
    v1 = make_patch(old, new)
    assert v1 is not None and len(patch) < len(v1) / 2, (len(patch), len(v1))   # a bit and a nibble per value
    # The next mask: the same elements, +1 where the step moved one (the host's overlap rule).
    expected = OverlapHistory.of_mask(mask).record_round(mask, released).with_counts(mask).to_bytes()
    assert patched_mask(mask_bytes, patch) == expected != mask_bytes
    # Weights the rule does not give (the merged delta in float, unquantized): no version 2 patch.
    assert make_step_patch(old, _stepped_weights(tiny_bundle, merged.to_dense(k), mask), mask_bytes, step) is None


def test_step_patch_refuses_another_mask_a_newer_version_and_damage(tiny_bundle) -> None:
    merged, mask = _merged(tiny_bundle, seed=3)
    step = quantize_step(merged.to_dense(mask.total_selected))
    old, mask_bytes = (tiny_bundle / mf.WEIGHTS).read_bytes(), (tiny_bundle / mf.MASK).read_bytes()
    patch = make_step_patch(old, _stepped_weights(tiny_bundle, step.values(), mask), mask_bytes, step)
    assert patch is not None
    other = Mask(order=list(mask.order), shapes=dict(mask.shapes), indices=dict(mask.indices),
                 total_params=mask.total_params, overlap={n: c + 1 for n, c in mask.overlap.items()}).to_bytes()
    for wrong in (other, None):
        with pytest.raises(PatchError, match="another mask"):
            apply_patch(old, patch, wrong)
    with pytest.raises(PatchError, match="another mask"):
        patched_mask(other, patch)
    length = int.from_bytes(patch[8:16], "little")
    header, body = json.loads(patch[16:16 + length]), zlib.decompress(patch[16 + length:])

    def remade(header: dict, body: bytes) -> bytes:
        data = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return b"ECLPATCH" + len(data).to_bytes(8, "little") + data + zlib.compress(body)

    with pytest.raises(PatchError, match="format version 3"):
        apply_patch(old, remade({**header, "format_version": 3}, body), mask_bytes)
    bitmap_bytes = -(-header["k"] // 8)
    minus_eight = bytearray(body)
    minus_eight[bitmap_bytes] = (minus_eight[bitmap_bytes] & 0xF0) | 0x08     # -8: outside symmetric int4
    with pytest.raises(PatchError, match="outside int4"):
        apply_patch(old, remade(header, bytes(minus_eight)), mask_bytes)
    cleared = bytearray(body)
    cleared[0] ^= next(1 << i for i in range(8) if cleared[0] >> i & 1)       # one value fewer than declared
    with pytest.raises(PatchError, match="bitmap"):
        apply_patch(old, remade(header, bytes(cleared)), mask_bytes)
    moved = bytearray(body)
    moved[bitmap_bytes] ^= 0x01                                               # another value: another result
    with pytest.raises(PatchError, match="to_sha256"):
        apply_patch(old, remade(header, bytes(moved)), mask_bytes)
    for cut in (len(patch) - 3, 40):
        with pytest.raises(PatchError):
            apply_patch(old, patch[:cut], mask_bytes)


@pytest.fixture(scope="module")
def stepped(tiny_bundle, tmp_path_factory):
    """v2 made as `edgecl release` makes it: the merged delta quantized (the released step), applied by
    the host (`apply_delta`: weights, mask counts, prototypes, graphs), and its version 2 patch
    against v1; stored and released on a real server."""
    from edgecl.host.apply import apply_delta

    root = tmp_path_factory.mktemp("stepped")
    merged, mask = _merged(tiny_bundle, seed=4)
    step = quantize_step(merged.to_dense(mask.total_selected))
    v2 = root / "v2"
    apply_delta(tiny_bundle, released_delta(merged, step), v2, progress=False)
    name = attach_weights_patch(v2, tiny_bundle / mf.WEIGHTS, step, tiny_bundle / mf.MASK)
    assert name is not None and read_header((v2 / name).read_bytes())["format_version"] == 2
    for served in serve_release(root / "store", tiny_bundle, v2, ["cam-1"]):
        yield {**served, "token": served["creds"]["cam-1"][0], "v2": v2, "patch": name}


def _device_files(bundle: Path, server_files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in _tree(bundle).items() if not k.startswith("state") and k not in server_files}


def test_the_release_step_pulls_as_bits_and_nibbles_and_the_mask_is_made_on_the_device(stepped, tiny_bundle,
                                                                                         tmp_path):
    report = pull(_device(tiny_bundle, tmp_path), stepped["server"].url, stepped["token"], stepped["public"],
                  policy=FAST)
    new, v2 = Path(report.bundle_dir), stepped["v2"]
    server_files = mf.load_manifest(v2).server_files
    assert report.patched == [mf.WEIGHTS] and report.derived == [mf.MASK]
    assert mf.MASK not in report.downloaded and mf.MASK not in report.wire_bytes
    assert report.wire_bytes[mf.WEIGHTS] <= (v2 / stepped["patch"]).stat().st_size + 64
    assert mf.TRAIN_STEP in report.copied and mf.INFERENCE_MODEL in report.copied   # same mask elements
    assert _device_files(new, server_files) == _device_files(v2, server_files)      # byte-identical, signed
    print(f"downlink {report.downloaded_bytes:,} B ({report.wire_bytes}), derived {report.derived}")


def test_a_mask_the_patch_does_not_give_is_downloaded_and_the_weights_still_patched(stepped, tiny_bundle,
                                                                                     tmp_path):
    """A release whose mask is not v1's plus this step (other counts: a release that chose another
    history) is signed as it is: the derived mask is not taken, the signed one is downloaded.
    Released after the other tests of this server (the device then pulls v3)."""
    v3 = tmp_path / "v3"
    shutil.copytree(stepped["v2"], v3)
    mask = Mask.load_file(v3 / mf.MASK)
    Mask(order=list(mask.order), shapes=dict(mask.shapes), indices=dict(mask.indices), total_params=mask.total_params,
         overlap={n: c + 2 for n, c in mask.overlap.items()}).save_file(v3 / mf.MASK)
    manifest = json.loads((v3 / mf.MANIFEST).read_text())
    manifest["mask_sha256"] = manifest["files"][mf.MASK] = hashlib.sha256((v3 / mf.MASK).read_bytes()).hexdigest()
    manifest["sizes"][mf.MASK], manifest["version"] = (v3 / mf.MASK).stat().st_size, 3
    (v3 / mf.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    add_bundle_dir(stepped["store"], v3)
    release_version(stepped["store"], manifest["bundle_id"], 3)
    report = pull(_device(tiny_bundle, tmp_path), stepped["server"].url, stepped["token"], stepped["public"],
                  policy=FAST)
    assert report.version == 3 and report.patched == [mf.WEIGHTS] and report.derived == []
    assert mf.MASK in report.downloaded
    server_files = mf.load_manifest(v3).server_files
    assert _device_files(Path(report.bundle_dir), server_files) == _device_files(v3, server_files)

# -- answers no honest server gives: a loopback HTTP server that says them -------------------------------
class _Script(http.server.BaseHTTPRequestHandler):
    routes: dict[str, Callable[[_Script], None]] = {}
    hits: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?")[0]
        _Script.hits[path] = _Script.hits.get(path, 0) + 1
        self.routes.get(path, lambda h: h.send_error(404))(self)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def script() -> Iterator[tuple[str, dict]]:
    _Script.routes, _Script.hits = {}, {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Script.routes
    httpd.shutdown()
    httpd.server_close()


def _json(obj: object) -> Callable[[_Script], None]:
    def answer(h: _Script) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return answer


def _bytes(data: bytes) -> Callable[[_Script], None]:
    def answer(h: _Script) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return answer


def _endless(h: _Script) -> None:
    """An answer without end (no Content-Length, closed only when the client hangs up)."""
    h.send_response(200)
    h.end_headers()
    chunk = b"\0" * (1 << 16)
    try:
        for _ in range(1 << 14):          # 1 GiB at most, so a broken client cannot hang the test forever
            h.wfile.write(chunk)
    except OSError:
        pass


def _signed_release(tiny_bundle: Path, tmp_path: Path, sizes: bool) -> tuple[dict, bytes, str, Path]:
    """A v2 manifest (with or without signed sizes) signed by a key the device pins."""
    v2 = _next_version(tiny_bundle, tmp_path / "v2")
    manifest = json.loads((v2 / mf.MANIFEST).read_text())
    if not sizes:
        manifest.pop("sizes")
    data = json.dumps(manifest, sort_keys=True).encode()
    private = generate_private_key()
    signature = sign_manifest(private, manifest_object(data))
    release = {"bundle_id": manifest["bundle_id"], "version": 2, "signature": signature,
               "files": {mf.MANIFEST: {"sha256": hashlib.sha256(data).hexdigest()}}}
    return release, data, public_key(private).hex(), v2


@pytest.mark.parametrize("sizes", [True, False], ids=["signed-size", "hard-cap"])
def test_an_endless_answer_is_cut_at_the_signed_size_or_the_hard_cap(script, tiny_bundle, tmp_path, sizes):
    url, routes = script
    release, manifest_bytes, key, v2 = _signed_release(tiny_bundle, tmp_path, sizes)
    base = f"/v1/bundles/{release['bundle_id']}/2/files/"
    routes["/v1/releases/latest"] = _json(release)
    routes[base + mf.MANIFEST] = _bytes(manifest_bytes)
    routes[base + mf.PROTOTYPES] = _endless
    old = _device(tiny_bundle, tmp_path)
    before = _tree(old)
    cap = (v2 / mf.PROTOTYPES).stat().st_size if sizes else 300_000
    with pytest.raises(EdgeclError, match=f"larger than the {cap:,} bytes"):
        pull(old, url, "t", key, policy=FAST, max_bytes=300_000)
    assert _tree(old) == before and sorted(p.name for p in old.parent.iterdir()) == ["bundle"]
    assert _Script.hits[base + mf.PROTOTYPES] == 1, "a refusal is not retried"


def test_an_endless_answer_without_any_size_stops_at_the_hard_cap(script, tmp_path):
    url, routes = script
    routes["/f"] = _endless
    dest = tmp_path / "f"
    with pytest.raises(EdgeclError, match="larger than the 1,000,000 bytes"):
        download(url, "t", "/f", dest, "0" * 64, FAST, max_bytes=1_000_000)
    assert not dest.exists()


def test_an_endless_release_answer_is_refused_not_read_into_memory(script, tiny_bundle, tmp_path):
    url, routes = script
    routes["/v1/releases/latest"] = _endless
    with pytest.raises(MalformedAnswer, match="answered more than"):
        pull(_device(tiny_bundle, tmp_path), url, "t", public_key(generate_private_key()).hex(), policy=FAST)
    assert _Script.hits["/v1/releases/latest"] == 1


@pytest.mark.parametrize("answer, problem", [
    ({"version": "abc", "files": {}}, "version 'abc' is not a whole number"),
    ({"version": 2, "files": {mf.MANIFEST: "deadbeef"}}, "files entry 'manifest.json' is not"),
    ({"version": 2, "files": ["manifest.json"]}, "files is not an object"),
    ([1, 2], "answered something that is not a JSON object"),
])
def test_a_malformed_release_is_one_line(script, tiny_bundle, tmp_path, answer, problem):
    url, routes = script
    routes["/v1/releases/latest"] = _json(answer)
    old = _device(tiny_bundle, tmp_path)
    with pytest.raises(MalformedAnswer, match=problem) as caught:
        pull(old, url, "t", public_key(generate_private_key()).hex(), policy=FAST)
    assert "\n" not in str(caught.value)
    result = subprocess.run([str(Path(sys.executable).parent / "edgecl"), "pull", str(old), "--server", url,
                             "--token", "t", "--server-key", public_key(generate_private_key()).hex()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and problem in result.stderr, result.stderr


# -- a full disk is the disk's fault ---------------------------------------------------------------------
def test_a_full_disk_is_a_disk_error_and_not_retried(script, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    url, routes = script
    routes["/f"] = _bytes(b"x" * 300_000)
    dest = tmp_path / "f"
    dest.symlink_to("/dev/full")                     # every write there fails with ENOSPC
    with pytest.raises(DiskError, match=f"no space left on the device while writing {dest}") as caught:
        download(url, "t", "/f", dest, "0" * 64, FAST)
    assert "free space" in str(caught.value) and "network" not in str(caught.value)
    assert _Script.hits["/f"] == 1, "a full disk is not retried"


def test_a_full_disk_during_pull_names_the_path_and_leaves_the_device_as_it_was(patched, tiny_bundle, tmp_path):
    """`edgecl pull` on a real tmpfs too small for the new version (a user namespace mounts it)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
            capture_output=True).returncode != 0:
        pytest.skip("no user namespaces to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kb = sum(p.stat().st_size for p in tiny_bundle.rglob("*") if p.is_file()) // 1024 + 200
    edgecl = Path(sys.executable).parent / "edgecl"
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && cp -r {tiny_bundle} {disk}/bundle && "
              f"before=$(cd {disk}/bundle && find . -type f | sort | xargs sha256sum | sha256sum) && "
              f"{edgecl} pull {disk}/bundle --server {patched['server'].url} --token {patched['token']} "
              f"--server-key {patched['public']} --retries 2; echo \"rc=$?\"; "
              f"after=$(cd {disk}/bundle && find . -type f | sort | xargs sha256sum | sha256sum); "
              f"[ \"$before\" = \"$after\" ] && echo same; ls -A {disk}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "rc=1" in result.stdout, result.stdout + result.stderr
    assert result.stderr.startswith("error: no space left on the device while writing " + str(disk)), result.stderr
    assert "disk space" in result.stderr and "network" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.split("rc=1")[1].split() == ["same", "bundle"], "old bundle intact, no temp left"


def test_manifest_file_lists_are_checked(tiny_bundle):
    """server_files, sizes and weights_patches are signed: a device refuses lists that contradict each other."""
    from edgecl.errors import BundleError

    good = json.loads((tiny_bundle / mf.MANIFEST).read_text())
    assert set(good["sizes"]) == set(good["files"]) and good["server_files"] == {}
    sha = "ab" * 32
    cases = [({"server_files": {mf.WEIGHTS: sha}}, "in files and in server_files"),
             ({"sizes": {"nope.bin": 3}}, "sizes must give"),
             ({"sizes": {mf.WEIGHTS: -1}}, "sizes must give"),
             ({"server_files": {"../x": sha}}, "server_files must map plain file names"),
             ({"weights_patches": {sha: "weights.patch"}}, "weights_patches must map")]
    for change, problem in cases:
        with pytest.raises(BundleError, match=problem):
            mf.BundleManifest.from_json({**good, **change})
    assert mf.stored_files({**good, "server_files": {"x.patch": sha}}) == {**good["files"], "x.patch": sha}
