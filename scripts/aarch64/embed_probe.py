"""Embeddings at an adapted delta two ways, on whichever machine runs this (x86_64 or emulated aarch64).

    python embed_probe.py BUNDLE TRAINABLE IMAGES.npy BAKED.onnx OUT.npz

- runtime:   edgecl's own InferenceRunner (inference.onnx + the patched weights handed to onnxruntime
             as initializer overrides, full graph optimization), what `predict`/`eval`/adapt's
             prototypes use;
- reference: BAKED.onnx (the same weights written into the file on the host) with every graph
             optimization off.
They must agree to float32 rounding: a larger gap means the runtime did not run the patched weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from edgecl.device.ort import InferenceRunner  # noqa: E402
from edgecl.formats import manifest as mf  # noqa: E402
from edgecl.formats.mask import Mask  # noqa: E402


def main(bundle: Path, trainable: Path, images: Path, baked: Path, out: Path) -> None:
    x = np.load(images)
    delta = load_file(str(trainable))[mf.DELTA_PARAM]
    prototypes = load_file(str(bundle / mf.PROTOTYPES))["prototypes"]
    runner = InferenceRunner(bundle / mf.INFERENCE_MODEL, bundle / mf.WEIGHTS, Mask.load_file(bundle / mf.MASK), threads=1)
    runtime = runner.run(x, delta, prototypes)[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(baked), sess_options=options, providers=["CPUExecutionProvider"])
    reference = session.run(["embeddings"], {"images": x, "prototypes": prototypes})[0]
    np.savez(out, runtime=runtime, reference=reference)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:6]))
