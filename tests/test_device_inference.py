"""The device's inference at a non-zero delta runs exactly W0 + scatter(delta) (device/ort.py InferenceRunner).

Regression: overriding initializers with SessionOptions.add_initializer was silently ignored by x86
onnxruntime's NCHWc transformer for most convolutions (embeddings 1.7e-2 off); the runner now patches the
weights file's bytes in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgecl.formats import manifest as mf
from edgecl.formats.images import normalize
from edgecl.formats.mask import Mask
from edgecl.formats.weights import load_weights


def test_runner_at_a_delta_equals_the_torch_model_with_patched_weights(tiny_bundle: Path) -> None:
    from edgecl.device.ort import InferenceRunner
    from edgecl.host.apply import _recipe_from_manifest
    from edgecl.host.model import build_embedding_model

    manifest = mf.load_manifest(tiny_bundle)
    mask = Mask.load_file(tiny_bundle / mf.MASK)
    delta = np.random.default_rng(0).normal(0, 0.05, mask.total_selected).astype(np.float32)
    base = load_weights(tiny_bundle / mf.WEIGHTS)
    patched = {**base, **mask.scatter(delta, base)}
    h, w = manifest.input_size
    images = normalize(np.random.default_rng(1).integers(0, 256, (8, h, w, 3)).astype(np.uint8),
                       manifest.mean, manifest.std)

    def embed(weights: dict[str, np.ndarray]) -> np.ndarray:
        model = build_embedding_model(_recipe_from_manifest(manifest))  # the architecture; weights set below
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(weights[name]))
            return model(torch.from_numpy(images)).numpy()

    expected, at_zero = embed(patched), embed(base)
    runner = InferenceRunner(tiny_bundle / mf.INFERENCE_MODEL, tiny_bundle / mf.WEIGHTS, mask)
    protos = np.ones((1, manifest.embedding_dim), np.float32)
    got = runner.run(images, delta, protos)[0]
    moved = np.linalg.norm(expected - at_zero) / np.linalg.norm(expected)
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert moved > 1e-2, "the delta must move the embeddings for this test to mean anything"
    assert error < 1e-5, f"inference at the delta is {error:.2e} off the patched model"
    # back at a zero delta the runner gives the base model again (a fresh session, not the patched one)
    back = runner.run(images, np.zeros_like(delta), protos)[0]
    assert np.linalg.norm(back - at_zero) / np.linalg.norm(at_zero) < 1e-5
