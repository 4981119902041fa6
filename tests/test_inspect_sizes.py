"""`edgecl inspect` reports the delta sizes of a bundle (issue 4: "`inspect` shows both numbers"): the
exact bytes of a delta file with every selected element changed, per value encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.inspect import inspect_bundle

runner = CliRunner()


def _real_delta(bundle: Path, vector: np.ndarray) -> delta_format.Delta:
    m = mf.load_manifest(bundle)
    return delta_format.Delta.from_dense(
        vector, bundle_id=m.bundle_id, bundle_version=m.version, base_sha256=m.base_sha256,
        mask_sha256=m.mask_sha256, device_id="line3-cam01", steps=7, samples_seen=9)


def test_delta_sizes_are_those_of_real_files(tiny_bundle: Path, tmp_path: Path) -> None:
    info = inspect_bundle(tiny_bundle)
    sizes, fractions = info["delta_bytes"], info["delta_fraction_of_base"]
    assert list(sizes) == ["fp32", "fp16", "int8", "int4"]
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    k, base = info["selected"], info["base_fp32_bytes"]
    assert base == info["parameters"] * 4
    for enc in sizes:
        assert fractions[enc] == sizes[enc] / base
    # The values alone take 4 / 2 / 1 bytes per selected element (int8: plus one fp32 scale per 1024).
    assert sizes["fp32"] > 4 * k and sizes["fp16"] > 2 * k and sizes["int8"] > k + 4 * -(-k // 1024)
    assert sizes["int4"] > -(-k // 2) + 4 * -(-k // 64)  # two values per byte, one fp32 scale per 64

    # A real signed file with every selected element changed (random nonzero values) has exactly these
    # sizes, and one with half of them changed is smaller.
    rng = np.random.default_rng(0)
    # |v| >= 0.1 > max|v| / 14: no value rounds to 0 even at int4
    values = rng.uniform(0.1, 1.0, k).astype(np.float32) * rng.choice([-1.0, 1.0], k).astype(np.float32)
    half = values.copy()
    half[rng.permutation(k)[: k // 2]] = 0
    key = bytes(range(32))
    for enc in sizes:
        path = tmp_path / f"all-{enc}.safetensors"
        delta_format.save_file(_real_delta(tiny_bundle, values), path, key, values=enc)
        assert path.stat().st_size == sizes[enc], enc
        loaded = delta_format.load_file(path, key)
        assert loaded.changed_positions().size == k
        smaller = delta_format.save(_real_delta(tiny_bundle, half), key, values=enc)
        assert len(smaller) < sizes[enc], enc


def test_inspect_cli_prints_kb_and_share_of_base(tiny_bundle: Path) -> None:
    info = json.loads(runner.invoke(app, ["inspect", str(tiny_bundle), "--json"]).stdout)
    assert set(info["delta_bytes"]) == {"fp32", "fp16", "int8", "int4"}
    result = runner.invoke(app, ["inspect", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("delta "))
    base = info["base_fp32_bytes"]
    for enc, n in info["delta_bytes"].items():
        assert f"{enc} {n / 1e3:,.1f} kB = {100 * n / base:.2f}%" in line
