"""What the shared-exemplars section (delta format 4, profile ``share_exemplars``) adds to a delta on
B3's data: Fashion-MNIST at EfficientNet-Lite0's 64 px, 20 exemplars per class (the device's cap) of
device A's two classes, decoded as the device stores them and written by the reference writer. The
delta around it changes no weight, so the bytes are the section's plus a few kB of prototypes.

Run: .venv/bin/python benchmarks/b3_delta/shared_exemplars_size.py [--per-class 20] [--classes 6 7]
Needs the Fashion-MNIST files (`sudo apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgecl.datasets import write_fashion_folder
from edgecl.formats import delta as delta_format
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.images import load_image_folder
from edgecl.formats.prototypes import Prototypes

LITE0_FP32_BYTES = 3_350_000 * 4     # the B4 bundle's manifest total_params x 4 (benchmarks/results/b3_delta.json)
LITE0_K, LITE0_D = 167_505, 1280    # its 5% mask's selected count and embedding size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--classes", type=int, nargs="+", default=[6, 7])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_fashion_folder(folder, args.classes, args.per_class)
        images = load_image_folder(folder, [64, 64], "bilinear", progress=False)
    memory = ExemplarMemory(list(images.classes), images.pixels, images.labels)
    n = len(images.classes)
    table = Prototypes(list(images.classes), np.zeros((n, LITE0_D), np.float32), np.full(n, 300, np.int64))
    d = delta_format.Delta.from_dense(np.zeros(LITE0_K, np.float32), bundle_id="b3", bundle_version=1,
                                      base_sha256="0" * 64, mask_sha256="0" * 64, device_id="device-a",
                                      samples_seen=300 * n, prototypes=table, exemplars=memory)
    data = delta_format.save(d, values="int4", prototypes_dtype="fp16")
    section = delta_format.read_header(data).exemplar_bytes
    print(json.dumps({"images": int(len(memory.labels)), "raw_pixel_bytes": int(memory.pixels.nbytes),
                      "section_bytes": section, "file_bytes": len(data),
                      "section_percent_of_lite0_fp32": round(100 * section / LITE0_FP32_BYTES, 3)}))


if __name__ == "__main__":
    main()
