"""`edgecl watch`'s fast path answers exactly what `edgecl predict` answers (B8's speedups change no answer).

The serving path decodes straight into the model's input rows through a lookup table (preprocess.py),
runs full batches on a session with the batch dimension fixed (ort.InferenceRunner) and takes the
top answer for a whole batch at once (ServingState.top1): each is checked against the plain path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecl.device.watch import Watcher, WatchOptions
from edgecl.formats import manifest as mf
from edgecl.formats.images import load_input, load_rgb
from edgecl.formats.preprocess import Preprocess, _normalize_values, normalize


def test_the_lookup_table_is_bit_identical_to_the_arithmetic() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 9, 7, 3)).astype(np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    for mean, std in [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        got, want = normalize(pixels, mean, std), _normalize_values(pixels, mean, std)
        assert got.dtype == np.float32 and got.shape == (3, 3, 9, 7) and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "CMYK", "I;16"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_load_input_is_normalize_of_load_rgb_bit_for_bit(tmp_path: Path, mode: str, interpolation: str) -> None:
    preprocess = Preprocess((24, 20), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation)
    for i, size in enumerate([(11, 13), (20, 24), (57, 31)]):  # up, same size, down
        path = tmp_path / f"{mode.replace(';', '')}-{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        _image(mode, size, i).save(path)
        assert Image.open(path).mode == mode
        out = np.full((3, 24, 20), np.nan, np.float32)
        load_input(path, preprocess, out)
        want = preprocess(load_rgb(path, preprocess.input_size, interpolation)[None])[0]
        assert out.tobytes() == want.tobytes(), (mode, size, interpolation)


def test_a_fixed_batch_session_gives_the_free_batch_session_s_answers(tiny_bundle: Path) -> None:
    from edgecl.device.ort import InferenceRunner
    from edgecl.formats.mask import Mask

    m = mf.load_manifest(tiny_bundle)
    mask = Mask.load_file(tiny_bundle / mf.MASK)
    h, w = m.input_size
    images = normalize(np.random.default_rng(1).integers(0, 256, (4, h, w, 3)).astype(np.uint8), m.mean, m.std)
    protos = np.random.default_rng(2).normal(size=(3, m.embedding_dim)).astype(np.float32)
    for delta in (np.zeros(mask.total_selected, np.float32),
                  np.random.default_rng(0).normal(0, 0.05, mask.total_selected).astype(np.float32)):
        free = InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask)
        fixed = InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask, batch=4)
        want, got = free.run(images, delta, protos), fixed.run(images, delta, protos)
        assert fixed._sessions[4].get_inputs()[0].shape[0] == 4  # the batch really is fixed in that session
        assert None not in fixed._sessions  # ... and the free one was not built for it
        for g, e in zip(got, want, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        # other sizes run on the free-batch session
        np.testing.assert_allclose(fixed.run(images[:3], delta, protos)[0], want[0][:3], rtol=1e-5, atol=1e-6)
        assert set(fixed._sessions) == {4, None}


def test_a_graph_whose_batch_cannot_be_fixed_runs_on_the_free_session(tiny_bundle: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecl.device import ort as ort_module
    from edgecl.formats.mask import Mask

    monkeypatch.setattr(ort_module, "_BATCH_DIM", "no such dimension")  # as a graph exported with another name
    m = mf.load_manifest(tiny_bundle)
    mask = Mask.load_file(tiny_bundle / mf.MASK)
    runner = ort_module.InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask, batch=4)
    h, w = m.input_size
    images = np.zeros((4, 3, h, w), np.float32)
    embeddings, _ = runner.run(images, np.zeros(mask.total_selected, np.float32), np.ones((1, m.embedding_dim), np.float32))
    assert embeddings.shape == (4, m.embedding_dim)
    assert runner.batch is None and set(runner._sessions) == {None}  # one session, not a useless second one


def test_watch_answers_what_predict_answers(bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    from edgecl.device.infer import predict

    cam = tmp_path / "cam"
    cam.mkdir()
    sources = sorted(p for d in sorted(calib_dir.iterdir()) for p in sorted(d.iterdir()))[:9]
    for i, src in enumerate(sources):  # the camera's images in several modes and sizes
        img = Image.open(src).convert("RGB")
        mode = ["RGB", "L", "P", "RGBA"][i % 4]
        img.resize((img.width + 3 * i, img.height)).convert(mode).save(cam / f"{i:02d}.png")
    opts = WatchOptions(settle_s=0.0, poll_s=0.01, batch_size=4, queue=False)  # 4 + 4 on the fixed session, 1 free
    log = tmp_path / "watch.jsonl"
    watcher = Watcher(bundle_copy, cam, opts, log=log)
    report = watcher.run(once=True)
    lines = {x["file"]: x for x in map(json.loads, log.read_text().splitlines())}
    assert report.images == 9 and len(lines) == 9
    assert set(watcher.follower.runner._sessions) == {4, None}  # both sessions were built before serving
    files = sorted(cam.iterdir())
    for answer in predict(bundle_copy, files):
        line = lines[Path(answer["path"]).name]
        assert line["class"] == answer["class"] and line["unknown"] == answer["unknown"]
        assert line["head"] == answer["head"] and line["state"] == answer["state"]
        # The same numbers up to the last bit of a float32 sum: watch's last batch holds one image, which
        # onnxruntime multiplies by the prototypes with its matrix-vector kernel (so did watch before the
        # fixed-batch session); predict's batch of 9 takes the matrix kernel. (1 - cosine: an absolute bound.)
        assert line["probability"] == pytest.approx(answer["probability"], rel=1e-5, abs=1e-6)
        assert line["unknown_score"] == pytest.approx(answer["unknown_score"], rel=1e-5, abs=1e-6)


def test_decoding_the_next_batch_ahead_changes_no_answer(bundle_copy: Path, calib_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from edgecl.device import watch as watch_module

    decoded_in: list[str] = []  # which thread decoded each batch
    real_decode = watch_module._decode

    def observed(*args: object) -> object:
        decoded_in.append(threading.current_thread().name)
        return real_decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(watch_module, "_decode", observed)
    cam = tmp_path / "cam"
    cam.mkdir()
    for i, src in enumerate(sorted(p for d in sorted(calib_dir.iterdir()) for p in sorted(d.iterdir()))[:11]):
        (cam / f"{i:02d}.png").write_bytes(src.read_bytes())
    (cam / "05-broken.png").write_bytes(b"not an image")  # an unreadable file in a prefetched batch
    answers = {}
    for prefetch in (False, True):
        decoded_in.clear()
        opts = WatchOptions(settle_s=0.0, poll_s=0.01, batch_size=3, queue=False, prefetch=prefetch)
        log = tmp_path / f"watch-{prefetch}.jsonl"
        watcher = Watcher(bundle_copy, cam, opts, log=log)
        assert (watcher._prefetch is not None) is prefetch
        report = watcher.run(once=True)
        assert report.images == 11 and report.unreadable == 1 and len(report.latencies_ms) == 11
        assert watcher._prefetch is None and watcher._pending is None  # the thread is stopped at the end
        ahead = [name for name in decoded_in if name.startswith("watch-decode")]
        assert len(decoded_in) == 4 and len(ahead) == (3 if prefetch else 0)  # 12 files in batches of 3
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        answers[prefetch] = sorted((x["file"], x.get("class"), x.get("probability"), x.get("error")) for x in lines)
    assert answers[True] == answers[False] and len(answers[True]) == 12


def test_a_frozen_delta_is_known_by_identity_and_a_writable_one_by_its_values(tiny_bundle: Path) -> None:
    """ServingState's delta is a read-only copy the runner recognises without hashing it per batch; a
    writable array changed in place is still seen by its values."""
    from edgecl.device.ort import InferenceRunner, frozen_delta
    from edgecl.formats.mask import Mask

    m = mf.load_manifest(tiny_bundle)
    mask = Mask.load_file(tiny_bundle / mf.MASK)
    h, w = m.input_size
    images = normalize(np.random.default_rng(1).integers(0, 256, (3, h, w, 3)).astype(np.uint8), m.mean, m.std)
    protos = np.ones((1, m.embedding_dim), np.float32)
    delta = np.random.default_rng(0).normal(0, 0.05, mask.total_selected).astype(np.float32)
    frozen = frozen_delta(delta)
    with pytest.raises(ValueError):
        frozen[0] = 1.0  # read-only: the values the runner's sessions were built with stay
    runner = InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask)
    plain = InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask)
    want = plain.run(images, delta, protos)[0]
    assert np.array_equal(runner.run(images, frozen, protos)[0], want)
    assert np.array_equal(runner.run(images, frozen, protos)[0], want)  # the second call: by identity
    at_zero = plain.run(images, np.zeros_like(delta), protos)[0]
    assert np.array_equal(runner.run(images, frozen_delta(np.zeros_like(delta)), protos)[0], at_zero)
    moving = delta.copy()  # a writable array: changed in place between calls, re-read every call
    first = runner.run(images, moving, protos)[0]
    moving[:] = 0.0
    assert np.array_equal(first, want) and np.array_equal(runner.run(images, moving, protos)[0], at_zero)


def test_watch_serves_an_adapted_state_as_its_weights_and_statistics_define_it(bundle_copy: Path, calib_dir: Path,
                                                                               tmp_path: Path) -> None:
    """After `adapt` moves the backbone (a non-zero delta, LDA statistics), the same watch process serves
    the new state: the embeddings of W0 + scatter(delta) from a runner of its own, the LDA head's
    float64 logits and the relative Mahalanobis score's float64 definition."""
    from edgecl.device.adapt import adapt
    from edgecl.device.heads import LdaHead
    from edgecl.device.ort import InferenceRunner
    from edgecl.device.plan import AdaptOptions
    from edgecl.device.state import load_current, open_bundle

    cam = tmp_path / "cam"
    cam.mkdir()
    sources = sorted(p for d in sorted(calib_dir.iterdir()) for p in sorted(d.iterdir()))[::3][:10]
    opts = WatchOptions(settle_s=0.0, poll_s=0.01, batch_size=4, queue=False)
    log = tmp_path / "watch.jsonl"
    watcher = Watcher(bundle_copy, cam, opts, log=log)
    for i, src in enumerate(sources[:4]):
        (cam / f"before-{i:02d}.png").write_bytes(src.read_bytes())
    watcher.files.scan()
    assert watcher.step() == 4
    adapt(bundle_copy, calib_dir, AdaptOptions(epochs=1, gate=False, progress=False))
    bundle = open_bundle(bundle_copy)
    state = load_current(bundle)
    assert np.count_nonzero(state.delta) > 0 and state.lda_path is not None
    for i, src in enumerate(sources):
        (cam / f"after-{i:02d}.png").write_bytes(src.read_bytes())
    watcher.files.scan()
    while watcher.step():  # 4 + 4 on the fixed-batch session, then 2 on the free one
        pass
    lines = {x["file"]: x for x in map(json.loads, log.read_text().splitlines()) if x["file"].startswith("after-")}
    assert len(lines) == len(sources) and {x["state"] for x in lines.values()} == {"gen-000001"}

    m = bundle.manifest
    files = sorted(cam.glob("after-*.png"))
    images = Preprocess.of(m)(np.stack([load_rgb(p, m.input_size, m.interpolation) for p in files]))
    runner = InferenceRunner(bundle.path(mf.INFERENCE_MODEL), bundle.path(mf.WEIGHTS), bundle.mask)
    z = runner.run(images, np.array(state.delta), state.prototypes.means)[0].astype(np.float64)
    lda = LdaHead.load_file(state.lda_path)
    classes = list(state.prototypes.classes)
    means = lda.means_for(classes, state.prototypes.means)
    logits = lda.logits(z, means)
    inv = np.linalg.inv(lda.covariance())
    centre = means.mean(0)
    total = lda.scatter / (lda.count - lda.groups) + (means - centre).T @ (means - centre) / len(means)
    dim = len(centre)
    background = (1 - lda.shrinkage) * total + lda.shrinkage * np.trace(total) / dim * np.eye(dim)

    def relative_mahalanobis(z: np.ndarray) -> np.ndarray:
        d = z[:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", d, inv, d).min(1) - np.einsum(
            "nd,de,ne->n", z - centre, np.linalg.inv(background), z - centre)

    unknown = relative_mahalanobis(z)
    # float32 scoring: the test model's embeddings are tiny (norm ~0.05), so its covariance's inverse is
    # large and the terms of the score cancel to about 4 significant digits of its largest magnitude
    # (the whole float32 matrix Q of the code before gave the same: 4.8e-3 here, the factor 6.2e-3).
    # At Lite0's magnitudes (D = 1280) the scores stay within 1e-4 of their spread (test_unknown.py).
    bound = 1e-3 * np.abs(unknown).max()
    at_w0 = runner.run(images, np.zeros_like(state.delta), state.prototypes.means)[0].astype(np.float64)
    assert np.abs(relative_mahalanobis(at_w0) - unknown).max() > 10 * bound  # the base weights would be seen
    for i, path in enumerate(files):
        line = lines[path.name]
        assert line["head"] == "lda" and line["class"] == classes[int(np.argmax(logits[i]))]
        assert line["unknown_score"] == pytest.approx(unknown[i], abs=bound)


def test_numpy_s_blas_runs_on_one_thread_while_watch_serves(bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    """onnxruntime's pool owns the cores: OpenBLAS's own threads would busy-wait against it after each
    per-batch product (B8 at 2 threads, an LDA state: a fifth of the images/s). Restored afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    cam = tmp_path / "cam"
    cam.mkdir()
    for i, src in enumerate(sorted(p for d in sorted(calib_dir.iterdir()) for p in sorted(d.iterdir()))[:5]):
        (cam / f"{i:02d}.png").write_bytes(src.read_bytes())
    seen: list[set[int]] = []
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core device
        blas = [x for x in threadpool_info() if x["user_api"] == "blas"]
        assert blas and {x["num_threads"] for x in blas} == {2}
        watcher = Watcher(bundle_copy, cam, WatchOptions(settle_s=0.0, poll_s=0.01, batch_size=2, queue=False),
                          log=tmp_path / "w.jsonl")
        watcher.on_batch = lambda _: seen.append(
            {x["num_threads"] for x in threadpool_info() if x["user_api"] == "blas"})
        assert watcher.run(once=True).images == 5
        assert seen == [{1}] * 3
        assert {x["num_threads"] for x in threadpool_info() if x["user_api"] == "blas"} == {2}


def test_watch_s_onnxruntime_threads_sleep_between_operators_and_answer_the_same(bundle_copy: Path, calib_dir: Path,
                                                                                tmp_path: Path) -> None:
    """watch decodes the next batch while onnxruntime runs this one: its pool threads do not busy-wait
    (B8 at 2 threads: the same images/s for a fifth less CPU); a plain batch loop (eval) keeps spinning
    (4-7% faster there). The option is really set on watch's sessions, and the answers do not change."""
    from edgecl.device.ort import _session_options

    def spinning(options) -> str | None:  # noqa: ANN001
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:          # not set: onnxruntime's default, spinning
            return None

    assert spinning(_session_options(2, spin=False)) == "0"
    assert spinning(_session_options(2)) is None and spinning(_session_options(1, spin=False)) is None
    cam = tmp_path / "cam"
    cam.mkdir()
    for i, src in enumerate(sorted(p for d in sorted(calib_dir.iterdir()) for p in sorted(d.iterdir()))[:4]):
        (cam / f"{i:02d}.png").write_bytes(src.read_bytes())
    lines = []
    for spin in (False, True):
        watcher = Watcher(bundle_copy, cam, WatchOptions(settle_s=0.0, poll_s=0.01, batch_size=2, queue=False),
                          log=tmp_path / f"w{spin}.jsonl")
        runner = watcher.follower.runner
        assert runner._spin is False                        # what watch builds
        runner._spin = spin
        runner.release()                                    # its sessions are built again, with that option
        assert watcher.run(once=True).images == 4
        lines.append([{k: v for k, v in json.loads(x).items() if k in ("file", "class", "probability")}
                      for x in (tmp_path / f"w{spin}.jsonl").read_text().splitlines()])
    assert lines[0] == lines[1]
