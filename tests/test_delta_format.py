"""The delta file (docs/delta-format.md): golden bytes, round trips within the documented
tolerances, and one named error per failure."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from edgecl_test_deltas import forge, make_delta, make_manifest, make_mask
from safetensors.numpy import load as st_load

from edgecl.errors import EdgeclError
from edgecl.formats import delta as D
from edgecl.formats.prototypes import Prototypes

FIXTURES = Path(__file__).parent / "fixtures"
KEY = bytes(range(32))


def _golden_delta() -> D.Delta:
    # The same delta tests/fixtures/make_delta_golden.py builds by hand (literal JSON + struct).
    return D.Delta(bundle_id="demo-bundle", bundle_version=2, base_sha256="0" * 63 + "1", mask_sha256="f" * 64,
                   device_id="line-3.cam_1", delta_k=10, positions=np.array([1, 4, 9]),
                   values=np.array([0.5, -0.3, -1.0], np.float32), steps=20, samples_seen=640,
                   metrics={"loss": 1.5, "acc": 0.75}, created_utc="2025-01-02T03:04:05Z",
                   prototypes=Prototypes(["cat", "d\u00f6g"], np.array([[1, 0, -2], [0.5, 0.25, 0.125]], np.float32),
                                         np.array([3, 5])),
                   heldout=HELDOUT)


HELDOUT = {"after": {"accuracy": 0.75, "images": 8, "per_class": {"cat": 0.5, "d\u00f6g": 1.0}},
           "before": {"accuracy": 0.5}}


def _golden_bytes() -> bytes:
    return bytes.fromhex((FIXTURES / "delta_golden.hex").read_text().replace("\n", ""))


def test_golden_bytes_exact():
    data = D.save(_golden_delta(), KEY, values="int8", layout="indices", int8_block=2, prototypes_dtype="fp16")
    assert data == _golden_bytes()


def test_golden_loads_and_is_plain_safetensors():
    golden = _golden_bytes()
    delta = D.load(golden, KEY)
    assert delta.heldout == HELDOUT and D.read_header(golden).heldout == HELDOUT
    assert delta.positions.tolist() == [1, 4, 9]
    assert delta.values_dtype == "int8" and delta.device_id == "line-3.cam_1" and delta.bundle_version == 2
    s0 = np.float32(0.5) / np.float32(127)
    np.testing.assert_allclose(delta.values, [0.5, -0.3, -1.0], atol=float(s0) / 2 + 1e-7)
    assert delta.prototypes is not None and delta.prototypes.classes == ["cat", "d\u00f6g"]
    assert delta.prototypes.counts.tolist() == [3, 5]
    assert delta.metrics == {"acc": 0.75, "loss": 1.5}
    # Any safetensors reader opens it (no edgecl code needed to get the tensors out).
    assert set(st_load(golden)) == {"delta.positions", "delta.values", "delta.scales",
                                    "prototypes.means", "prototypes.counts"}
    dense = delta.to_dense(10)
    assert dense.shape == (10,) and np.count_nonzero(dense) == 3


@pytest.mark.parametrize("layout", ["auto", "dense", "bitmap", "indices"])
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_round_trip_within_documented_tolerance(values, layout):
    rng = np.random.default_rng(7)
    for k, changed in ((1, 1.0), (37, 0.3), (5000, 0.05), (5000, 0.9)):
        vector = np.where(rng.random(k) < changed, rng.normal(0, 0.02, k), 0).astype(np.float32)
        delta = D.Delta.from_dense(vector, bundle_id="b", bundle_version=1, base_sha256="a" * 64,
                                   mask_sha256="b" * 64, device_id="d", created_utc="2025-01-01T00:00:00Z")
        data = D.save(delta, KEY, values=values, layout=layout, int8_block=64)
        out = D.load(data, KEY).to_dense(k)
        if values == "fp32":
            np.testing.assert_array_equal(out, vector)
        elif values == "fp16":
            bound = np.maximum(np.abs(vector) * 2.0**-11, 2.0**-25)
            assert np.all(np.abs(out - vector) <= bound)
        else:
            # |v - v'| <= s / 2 with s = max|v| / 127 of the value's block (+ one fp32 ulp).
            dense = D.read_header(data).metadata["layout"] == "dense"
            stored = vector if dense else vector[vector != 0]
            decoded = out if dense else out[vector != 0]
            for i in range(0, stored.size, 64):
                block, got = stored[i:i + 64], decoded[i:i + 64]
                assert np.all(np.abs(got - block) <= np.max(np.abs(block)) / 254 * (1 + 1e-6) + 1e-12)
        # Same delta -> same bytes (content addressing on the server relies on it).
        assert D.save(delta, KEY, values=values, layout=layout, int8_block=64) == data


def test_auto_layout_picks_the_smallest_body():
    k = 4096
    for changed, expected in ((0.001, "indices"), (0.2, "bitmap"), (0.99, "dense")):
        vector = np.zeros(k, np.float32)
        vector[: int(k * changed)] = 0.01
        delta = D.Delta.from_dense(vector, bundle_id="b", bundle_version=1, base_sha256="a" * 64,
                                   mask_sha256="b" * 64, device_id="d", created_utc="2025-01-01T00:00:00Z")
        header = D.read_header(D.save(delta, values="fp16"))
        assert header.metadata["layout"] == expected
        sizes = {lay: D.read_header(D.save(delta, values="fp16", layout=lay)).body_bytes for lay in D.LAYOUTS}
        assert header.body_bytes == min(sizes.values())


def test_int8_per_file_scale_and_zero_block():
    vector = np.array([0, 0.5, 0, -1.0, 0.25], np.float32)
    delta = D.Delta.from_dense(vector, bundle_id="b", bundle_version=1, base_sha256="a" * 64,
                               mask_sha256="b" * 64, device_id="d", created_utc="2025-01-01T00:00:00Z")
    data = D.save(delta, values="int8", int8_block=0, layout="indices")
    assert D.read_header(data).tensors["delta.scales"].shape == (1,)
    np.testing.assert_allclose(D.load(data).to_dense(), vector, atol=1.0 / 254 + 1e-7)
    zeros = D.Delta.from_dense(np.zeros(9, np.float32), bundle_id="b", bundle_version=1, base_sha256="a" * 64,
                               mask_sha256="b" * 64, device_id="d", created_utc="2025-01-01T00:00:00Z")
    assert not D.load(D.save(zeros, values="int8", layout="dense")).to_dense().any()


def test_stored_zero_means_unchanged():
    # int8 rounds a tiny value next to a big one to 0: it must read back as "not changed".
    vector = np.array([1.0, 1e-6, 0, 0], np.float32)
    delta = D.Delta.from_dense(vector, bundle_id="b", bundle_version=1, base_sha256="a" * 64,
                               mask_sha256="b" * 64, device_id="d", created_utc="2025-01-01T00:00:00Z")
    out = D.load(D.save(delta, values="int8", layout="indices"))
    assert out.changed_positions().tolist() == [0]


def test_save_file_is_atomic_and_load_file_reads_it(tmp_path):
    mask = make_mask()
    manifest = make_manifest(mask.to_bytes(), mask.total_selected)
    delta = make_delta(manifest, "dev-1", seed=3)
    path = tmp_path / "out" / "delta.safetensors"
    data = D.save_file(delta, path, KEY, values="fp16")
    assert path.read_bytes() == data and [p.name for p in path.parent.iterdir()] == ["delta.safetensors"]
    loaded = D.load_file(path, KEY)
    assert loaded.device_id == "dev-1" and loaded.prototypes is not None
    assert D.read_header(path).total_bytes == len(data)


def test_read_header_reads_only_the_header(tmp_path):
    data = D.save(_golden_delta(), KEY)
    n = struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "head-only.safetensors"
    path.write_bytes(data[: 8 + n])          # no body at all: the header is still readable
    header = D.read_header(path)
    assert header.device_id == "line-3.cam_1" and header.total_bytes == len(data)
    with pytest.raises(D.DeltaTruncatedError, match="truncated|has .* bytes"):
        D.load_file(path)


def test_to_dense_checks_k():
    with pytest.raises(D.DeltaShapeError, match="K=10"):
        D.load(_golden_bytes()).to_dense(11)


# -- one named error per failure ---------------------------------------------------------------------
def _bytes() -> bytes:
    return D.save(_golden_delta(), KEY)


def _expect(exc: type[D.DeltaError], data: bytes, key: bytes | None = KEY, match: str | None = None) -> None:
    with pytest.raises(exc, match=match) as info:
        D.load(data, key)
    assert isinstance(info.value, EdgeclError) and info.value.fix, "every error names a fix"
    assert "\n" not in str(info.value)


def test_truncated():
    _expect(D.DeltaTruncatedError, _bytes()[:-1])
    _expect(D.DeltaTruncatedError, _bytes()[:5])
    _expect(D.DeltaTruncatedError, _bytes()[:40])


def test_trailing_data():
    _expect(D.DeltaTrailingDataError, _bytes() + b"\0")


def test_header_too_large_is_refused_from_the_prefix_alone():
    with pytest.raises(D.DeltaHeaderTooLargeError):
        D.read_header(struct.pack("<Q", D.MAX_HEADER_BYTES + 8))


def test_non_canonical_header():
    data = _bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"bundle_id":', b'"bundle_id": ', 1).rstrip(b" ")
    header += b" " * ((-len(header)) % 8)
    _expect(D.DeltaHeaderError, struct.pack("<Q", len(header)) + header + data[8 + n:], match="canonical")


def test_tampered_body_byte():
    data = bytearray(_bytes())
    data[-1] ^= 1
    _expect(D.DeltaBodyHashError, bytes(data), key=None)


def test_tampered_header_fails_the_signature():
    data = _bytes()
    tampered = data.replace(b'"steps":"20"', b'"steps":"21"')
    assert tampered != data
    _expect(D.DeltaSignatureError, tampered)
    D.load(tampered, None)          # unsigned reading (no key) still works: only the HMAC knew


def test_wrong_key_and_unsigned():
    _expect(D.DeltaSignatureError, _bytes(), key=bytes(32), match="signature")
    _expect(D.DeltaSignatureError, D.save(_golden_delta(), None), match="not signed")


def test_nan_values_rejected():
    data = D.save(_golden_delta(), KEY, values="fp32", layout="indices")
    header = D.read_header(data)
    body = bytearray(data[8 + header.header_bytes:])
    info = header.tensors["delta.values"]
    body[info.begin:info.begin + 4] = np.array([np.nan], "<f4").tobytes()
    _expect(D.DeltaValueError, forge(data, KEY, body=bytes(body)), match="NaN")
    with pytest.raises(D.DeltaEncodeError, match="NaN"):
        D.save(D.Delta.from_dense(np.array([np.inf], np.float32), **_prov()), KEY)


def _prov() -> dict:
    return dict(bundle_id="b", bundle_version=1, base_sha256="a" * 64, mask_sha256="b" * 64, device_id="d",
                created_utc="2025-01-01T00:00:00Z")


def test_version_1_files_stay_readable():
    """What edgecl 0.1 wrote (format version 1, no held-out report) loads unchanged."""
    old = bytes.fromhex((FIXTURES / "delta_golden_v1.hex").read_text().replace("\n", ""))
    delta = D.load(old, KEY)
    assert D.read_header(old).metadata["format_version"] == "1" and delta.heldout is None
    new = D.load(_golden_bytes(), KEY)
    np.testing.assert_array_equal(delta.values, new.values)
    assert delta.prototypes.classes == new.prototypes.classes
    # a version 1 file cannot carry the version 2 key
    _expect(D.DeltaMetadataError, forge(old, KEY, meta={"heldout": '{"after":{"accuracy":1}}'}), match="version 1")


@pytest.mark.parametrize("value", ['{"after":{"accuracy":1.5}}', '{"later":{"accuracy":0.5}}', "{}",
                                   '{"after":{"images":3}}', '{"after":{"accuracy":0.5,"per_class":{"a":-1}}}',
                                   '{"after":{"accuracy":0.5,"images":-2}}', '["x"]'])
def test_bad_heldout(value):
    _expect(D.DeltaMetadataError, forge(_bytes(), KEY, meta={"heldout": value}), match="heldout")
    with pytest.raises(D.DeltaEncodeError, match="heldout"):
        import json

        D.save(D.Delta.from_dense(np.ones(3, np.float32), **_prov(), heldout=json.loads(value)))


def test_unknown_version():
    _expect(D.DeltaVersionError, forge(_bytes(), KEY, meta={"format_version": "6"}), match="version")
    _expect(D.DeltaVersionError, forge(_bytes(), KEY, meta={"format": "something-else"}))


@pytest.mark.parametrize("field,value", [("bundle_id", "../../etc"), ("device_id", "a/b"), ("device_id", ".hidden"),
                                         ("steps", "-1"), ("steps", "007"), ("base_sha256", "A" * 64),
                                         ("created_utc", "yesterday"), ("metrics", '{"acc":NaN}'),
                                         ("layout", "zip")])
def test_bad_metadata(field, value):
    _expect(D.DeltaMetadataError, forge(_bytes(), KEY, meta={field: value}), match=field)


def test_shape_mismatch_and_bad_positions():
    data = D.save(_golden_delta(), KEY, layout="indices")
    _expect(D.DeltaShapeError, forge(data, KEY, meta={"delta_k": "3"}), match="increasing")
    header = D.read_header(data)
    body = bytearray(data[8 + header.header_bytes:])
    info = header.tensors["delta.positions"]
    body[info.begin:info.end] = np.array([4, 1, 9], "<i4").tobytes()
    _expect(D.DeltaShapeError, forge(data, KEY, body=bytes(body)), match="increasing")
    bad = forge(data, KEY, header_patch={"delta.values": {"data_offsets": [0, 12], "dtype": "F32", "shape": [2]}})
    with pytest.raises(D.DeltaError):
        D.load(bad, KEY)


def test_encode_errors():
    with pytest.raises(D.DeltaEncodeError, match="fp16"):
        D.save(D.Delta.from_dense(np.array([1e6], np.float32), **_prov()), values="fp16")
    with pytest.raises(D.DeltaEncodeError, match="name"):
        D.save(D.Delta.from_dense(np.array([1.0], np.float32), **{**_prov(), "device_id": "../x"}))
    with pytest.raises(D.DeltaEncodeError, match="encoding"):
        D.save(D.Delta.from_dense(np.array([1.0], np.float32), **_prov()), values="bf16")


def test_parse_key():
    assert D.parse_key(KEY.hex() + "\n") == KEY
    with pytest.raises(D.DeltaMetadataError):
        D.parse_key("nope")


# -- int4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["dense", "bitmap", "indices"])
@pytest.mark.parametrize("k", [1, 7, 130, 1001])
def test_int4_round_trip_within_its_tolerance(layout: str, k: int) -> None:
    rng = np.random.default_rng(k)
    vector = rng.standard_normal(k).astype(np.float32)
    vector[rng.random(k) < 0.3] = 0
    data = D.save(D.Delta.from_dense(vector, **_prov()), KEY, values="int4", layout=layout, int4_block=64)
    back = D.load(data, KEY)
    assert back.values_dtype == "int4"
    dense = back.to_dense(k)
    assert np.abs(dense - vector).max() <= np.abs(vector).max() / 14 + 1e-6
    assert not dense[vector == 0].any(), "an unchanged entry must stay unchanged"
    # canonical: the same delta gives the same bytes
    assert D.save(D.Delta.from_dense(vector, **_prov()), KEY, values="int4", layout=layout, int4_block=64) == data


def test_int4_packing_is_the_documented_nibble_order() -> None:
    packed = D.pack_int4(np.array([1, -1, 7, -7, 3], np.int8))
    assert packed.tolist() == [0x01 | 0xF0, 0x07 | 0x90, 0x03]
    assert D.unpack_int4(packed, 5).tolist() == [1, -1, 7, -7, 3]


def test_int4_is_under_a_percent_of_fp32_at_a_five_percent_mask() -> None:
    k = 50_000  # 5% of a 1,000,000-parameter model, every element changed
    vector = np.random.default_rng(0).uniform(0.1, 1.0, k).astype(np.float32)
    size = len(D.save(D.Delta.from_dense(vector, **_prov()), KEY, values="int4"))
    assert size <= 0.01 * 1_000_000 * 4
    assert len(D.save(D.Delta.from_dense(vector, **_prov()), KEY, values="int8")) > 0.0125 * 1_000_000 * 4


@pytest.mark.parametrize("damage", ["minus_eight", "padding_nibble"])
def test_int4_damaged_values_are_rejected(damage: str) -> None:
    vector = np.array([0.5, -0.25, 1.0], np.float32)  # 3 values: the last byte has a padding nibble
    delta = D.Delta.from_dense(vector, **_prov())
    header = D.read_header(D.save(delta, values="int4", layout="dense", int4_block=0))
    tensors = {"delta.values": D.pack_int4(np.array([4, -2, 7], np.int8)),
               "delta.scales": np.array([1 / 7], np.float32)}
    if damage == "minus_eight":
        tensors["delta.values"][0] = 0x08 | (tensors["delta.values"][0] & 0xF0)
    else:
        tensors["delta.values"][1] |= 0x10
    meta = dict(header.metadata)
    _, body, _ = D._serialize(tensors, {**meta, "body_sha256": "", "hmac_sha256": ""})
    meta["body_sha256"] = __import__("hashlib").sha256(body).hexdigest()
    meta["hmac_sha256"] = ""
    head, body, _ = D._serialize(tensors, meta)
    pad = (-len(head)) % 8
    data = len(head + b" " * pad).to_bytes(8, "little") + head + b" " * pad + body
    with pytest.raises(D.DeltaError, match="-8" if damage == "minus_eight" else "padding nibble"):
        D.load(data)


def _with_base(dtype: str = "fp32") -> bytes:
    d = _golden_delta()
    d.base_prototypes = Prototypes(["d\u00f6g"], np.array([[0.25, 0.5, 1.0]], np.float32), np.array([5]))
    return D.save(d, KEY, prototypes_dtype=dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_base_prototypes_round_trip_as_version_3(dtype):
    """The device's classes under the bundle's own backbone (the release gate's frozen baseline) ride
    as version 3; a delta without them is still written as version 2, byte for byte as before."""
    data = _with_base(dtype)
    assert D.read_header(data).metadata["format_version"] == "3" and D.read_header(data).base_classes == ["d\u00f6g"]
    back = D.load(data, KEY)
    assert back.base_prototypes.classes == ["d\u00f6g"] and back.base_prototypes.counts.tolist() == [5]
    np.testing.assert_array_equal(back.base_prototypes.means, [[0.25, 0.5, 1.0]])
    assert back.prototypes.classes == ["cat", "d\u00f6g"]
    assert D.read_header(_bytes()).metadata["format_version"] == "2" and D.load(_bytes(), KEY).base_prototypes is None


def test_bad_base_prototypes_are_refused():
    data = _with_base()
    # version 2 cannot carry them, the names must be classes the delta has prototypes of
    _expect(D.DeltaMetadataError, forge(data, KEY, meta={"format_version": "2"}), match="version 3")
    _expect(D.DeltaMetadataError, forge(data, KEY, meta={"base_classes": '["cow"]'}), match="base_classes")
    _expect(D.DeltaShapeError, forge(data, KEY, meta={"base_classes": D.canonical_json(["cat", "d\u00f6g"])}),
            match="base_prototypes")
    # the tensors without the key is a malformed file
    import json

    meta = {k: v for k, v in json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"].items()
            if k != "base_classes"}
    _expect(D.DeltaShapeError, forge(data, KEY, header_patch={"__metadata__": meta}), match="tensors are")
    d = _golden_delta()
    d.base_prototypes = Prototypes(["cat"], np.array([[np.nan, 0, 0]], np.float32), np.array([1]))
    with pytest.raises(D.DeltaEncodeError, match="base-space"):
        D.save(d, KEY)


# -- shared exemplars (version 4, the fleet round's "exemplars shared" mode) ------------------------------
def _with_exemplars(per_class: tuple[int, ...] = (3, 2), size: int = 8) -> D.Delta:
    from edgecl.formats.exemplars import ExemplarMemory

    rng = np.random.default_rng(4)
    d = _golden_delta()
    labels = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(per_class)])
    d.exemplars = ExemplarMemory(list(d.prototypes.classes)[:len(per_class)],
                                 rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8), labels)
    return d


def test_shared_exemplars_round_trip_as_version_4_and_compressed():
    d = _with_exemplars()
    # A flat image compresses: the section is smaller than its pixels.
    d.exemplars.pixels[:] = 7
    data = D.save(d, KEY)
    header = D.read_header(data)
    assert header.metadata["format_version"] == "4"
    assert header.exemplar_classes == ["cat", "d\u00f6g"] and header.exemplar_shape == (5, 8, 8, 3)
    assert 0 < header.exemplar_bytes < d.exemplars.pixels.nbytes
    back = D.load(data, KEY)
    assert back.exemplars is not None and back.exemplars.classes == ["cat", "d\u00f6g"]
    assert np.array_equal(back.exemplars.pixels, d.exemplars.pixels)
    assert back.exemplars.labels.tolist() == [0, 0, 0, 1, 1]
    # Same delta, same bytes (the server stores by sha256).
    assert D.save(d, KEY) == data
    # Without exemplars the file stays at the lowest version that holds it.
    assert D.read_header(D.save(_golden_delta(), KEY)).metadata["format_version"] == "2"


def test_shared_exemplars_only_of_the_deltas_own_classes():
    d = _with_exemplars()
    d.exemplars.classes = ["cat", "rivet"]       # a class the delta has no prototype of
    with pytest.raises(D.DeltaEncodeError, match="no prototype of"):
        D.save(d, KEY)
    good = D.save(_with_exemplars(), KEY)
    forged = forge(good, KEY, meta={"exemplar_classes": D.canonical_json(["cat", "rivet"])})
    with pytest.raises(D.DeltaMetadataError, match="no prototype of"):
        D.load(forged, KEY)


def test_shared_exemplars_refused_when_damaged_or_absurd():
    import zlib

    good = D.save(_with_exemplars(), KEY)
    header = D.read_header(good)
    info = header.tensors[D.T_EXEMPLAR_PIXELS]
    body = good[8 + header.header_bytes:]
    cases = {
        # a stream that inflates to more than the declared shape (a decompression bomb) or less
        "bomb": zlib.compress(b"\0" * (10 * 5 * 8 * 8 * 3)),
        "short": zlib.compress(b"\0" * 100),
        "not zlib": b"\x01\x02\x03\x04",
    }
    for stream in cases.values():
        tensor = np.frombuffer(stream, np.uint8)
        new_body = body[:info.begin] + stream + body[info.end:]
        patch = {D.T_EXEMPLAR_PIXELS: {"data_offsets": [info.begin, info.begin + tensor.size], "dtype": "U8",
                                       "shape": [tensor.size]}}
        shift = tensor.size - (info.end - info.begin)
        for other, t in header.tensors.items():
            if t.begin >= info.end:
                patch[other] = {"data_offsets": [t.begin + shift, t.end + shift], "dtype": t.dtype,
                                "shape": list(t.shape)}
        with pytest.raises(D.DeltaShapeError, match="zlib|inflate"):
            D.load(forge(good, KEY, body=new_body, header_patch=patch), KEY)
    too_many = forge(good, KEY, meta={"exemplar_shape": D.canonical_json([D.MAX_EXEMPLAR_IMAGES + 1, 8, 8, 3])})
    with pytest.raises(D.DeltaMetadataError, match="exemplar_shape"):
        D.read_header(too_many)
    older = forge(good, KEY, meta={"format_version": "3"})
    with pytest.raises(D.DeltaMetadataError, match="version 4"):
        D.read_header(older)
