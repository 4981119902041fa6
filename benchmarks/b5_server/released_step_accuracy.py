"""Does the release's int4 step cost accuracy? (issue 22: the released weight change in the devices' int4)

    .venv/bin/python benchmarks/b5_server/released_step_accuracy.py /tmp/dl-downlink/new

Reads a finished `downlink_lite0.py --out DIR` run (its bundle-v1, data split and the server's merged
delta in DIR/release) and scores nearest class mean (class means of the train images, test images
scored by cosine, onnxruntime) under v1, v1 + the merged delta as the server wrote it (fp32), and
v1 + the released step (`edgecl.formats.weights_patch.quantize_step`: what `edgecl release` applies
and devices pull). Prints the three accuracies, how often the two deltas predict the same class, and
the smallest cosine between an image's two embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
from edgecl.device.state import open_bundle
from edgecl.formats import delta as delta_format
from edgecl.formats.images import load_image_folder
from edgecl.formats.weights_patch import quantize_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the --out folder of a downlink_lite0.py run that moved weights")
    args = parser.parse_args()
    bundle = open_bundle(args.out / "bundle-v1")
    k = bundle.mask.total_selected
    merged = next(d for d in (delta_format.load_file(p) for p in sorted((args.out / "release").glob("delta-*")))
                  if d.device_id == delta_format.MERGE_DEVICE_ID)
    vectors = {"v1": np.zeros(k, np.float32), "merged_fp32": merged.to_dense(k)}
    vectors["released_int4"] = quantize_step(vectors["merged_fp32"]).values()
    groups = [g for g in sorted((args.out / "data").iterdir()) if (g / "train").is_dir()]

    def images(split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [load_image_folder(g / split, bundle.manifest.input_size, bundle.manifest.interpolation,
                                   progress=False) for g in groups]
        return (np.concatenate([p.pixels for p in parts]),
                np.array([p.classes[i] for p in parts for i in p.labels]))

    (train, y_train), (test, y_test) = images("train"), images("test")
    runner = create_runner(bundle, resolve_profile(None, bundle))
    classes = sorted(set(y_train))
    predicted, embedded, result = {}, {}, {}
    for name, vector in vectors.items():
        e_train = embed_and_score(runner, bundle, train, vector)[0]
        e_test = embed_and_score(runner, bundle, test, vector)[0]
        means = np.stack([e_train[y_train == c].mean(0) for c in classes])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        embedded[name] = e_test / np.linalg.norm(e_test, axis=1, keepdims=True)
        predicted[name] = np.array(classes)[np.argmax(embedded[name] @ means.T, axis=1)]
        result[name] = round(float(np.mean(predicted[name] == y_test)), 4)
    result.update({
        "test_images": int(len(y_test)),
        "same_prediction": round(float(np.mean(predicted["merged_fp32"] == predicted["released_int4"])), 4),
        "min_embedding_cosine": round(float(np.min(np.sum(embedded["merged_fp32"] * embedded["released_int4"], 1))), 4),
        "relative_l2_step_vs_merged": round(float(np.linalg.norm(vectors["released_int4"] - vectors["merged_fp32"])
                                                  / max(np.linalg.norm(vectors["merged_fp32"]), 1e-30)), 4),
    })
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
