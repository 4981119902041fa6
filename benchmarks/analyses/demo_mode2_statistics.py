"""In mode 2, where should a device class's statistics come from? Reads `edgecl demo --share-exemplars --out DIR`.

    .venv/bin/edgecl demo --share-exemplars --out demo-m2
    .venv/bin/python benchmarks/analyses/demo_mode2_statistics.py demo-m2      # about a minute on 2 cores

Under v1 and under the released v2, the LDA head (the calibration classes' scatter dense from the
export's images, each device's at rank 16 from the exemplars it shared, as the release pools them)
with each device class's mean taken from:

- ``exemplars``: the 20 exemplars a class the device shared (what a mode-2 release uses);
- ``all images, moved``: the device's mean of all its training images under v1 (its delta's
  ``base_prototypes``) moved by the shift its exemplars measure between v1 and that backbone;
- ``all images``: the mean of all its training images under that backbone (what `edgecl restat`, or
  the device itself after a pull, computes);
- ``all images, their scatter too``: those means, and the devices' scatter from all their images
  (what a statistics round of the default mode sums).

Each scored on the demo's test images per class group. Writes benchmarks/out/demo_mode2_statistics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEVICES = ("device-a", "device-b")
GROUPS = {"old classes": "calib", "device-a classes": "device-a", "device-b classes": "device-b"}


def main() -> None:
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import embed_own_weights
    from edgecl.device.state import open_bundle
    from edgecl.formats import delta as delta_format
    from edgecl.formats import manifest as mf
    from edgecl.formats.images import load_image_folder
    from edgecl.formats.scatter import RANK_DEVICE, Scatter, class_scatter, pooled

    root = Path(sys.argv[1])
    m = mf.load_manifest(root / "bundle-v1")
    size = (int(m.input_size[0]), int(m.input_size[1]))

    def folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
        im = load_image_folder(path, size, m.interpolation)
        return im.pixels, np.asarray([im.classes[i] for i in im.labels])

    calib = folder(root / "data" / "calib" / "train")
    train = {d: folder(root / "data" / d / "train") for d in DEVICES}
    tests = {g: folder(root / "data" / f / "test") for g, f in GROUPS.items()}
    deltas = {d: delta_format.load_file(root / d / "delta.safetensors") for d in DEVICES}
    shared = {}
    for d, x in deltas.items():
        if x.exemplars is None:
            raise SystemExit(f"{root / d / 'delta.safetensors'} shares no exemplars: run `edgecl demo --share-exemplars`")
        shared[d] = (x.exemplars.pixels, np.asarray([x.exemplars.classes[i] for i in x.exemplars.labels]))
    # a device that kept its backbone (its adaptation refused) sends its means under v1 as prototypes
    base = {d: x.base_prototypes if x.base_prototypes is not None else x.prototypes for d, x in deltas.items()}
    cache: dict[tuple[str, str], np.ndarray] = {}

    def embed(bundle: str, key: str, pixels: np.ndarray) -> np.ndarray:
        if (bundle, key) not in cache:
            cache[(bundle, key)] = embed_own_weights(open_bundle(root / bundle), pixels)
        return cache[(bundle, key)]

    def lda_scores(bundle: str, means: dict[str, np.ndarray], scatter_from: str = "shared") -> dict[str, float]:
        images = shared if scatter_from == "shared" else train
        parts = [class_scatter(embed(bundle, "calib", calib[0]), calib[1])]
        parts += [Scatter.of(embed(bundle, f"{scatter_from}-{d}", images[d][0]), images[d][1], RANK_DEVICE)
                  for d in DEVICES]
        classes = sorted(means)
        head = LdaHead(int(m.embedding_dim))
        head.scatter, head.count, head.groups = pooled(parts)
        table = np.stack([means[c] for c in classes])
        out = {}
        for group, (pixels, truth) in tests.items():
            predicted = np.asarray(classes)[head.logits(embed(bundle, f"test-{group}", pixels), table).argmax(1)]
            out[group] = round(100.0 * float((predicted == truth).mean()), 1)
        return out

    results: dict[str, dict[str, dict[str, float]]] = {}
    for bundle in ("bundle-v1", "bundle-v2"):
        if not (root / bundle / mf.MANIFEST).exists():
            continue
        cal = embed(bundle, "calib", calib[0])
        common = {c: cal[calib[1] == c].mean(0) for c in set(calib[1].tolist())}
        sources: dict[str, dict[str, np.ndarray]] = {k: dict(common) for k in ("exemplars", "all images, moved",
                                                                                "all images")}
        for d in DEVICES:
            here = embed(bundle, f"shared-{d}", shared[d][0])
            at_v1 = embed("bundle-v1", f"shared-{d}", shared[d][0])
            everything = embed(bundle, f"train-{d}", train[d][0])
            for c in sorted(set(shared[d][1].tolist())):
                mine = shared[d][1] == c
                sources["exemplars"][c] = here[mine].mean(0)
                sources["all images, moved"][c] = (base[d].means[base[d].classes.index(c)].astype(np.float64)
                                                   + here[mine].mean(0) - at_v1[mine].mean(0))
                sources["all images"][c] = everything[train[d][1] == c].mean(0)
        results[bundle] = {name: lda_scores(bundle, means) for name, means in sources.items()}
        results[bundle]["all images, their scatter too"] = lda_scores(bundle, sources["all images"], "train")
        for name, row in results[bundle].items():
            print(f"{bundle}  {name:<18} " + "  ".join(f"{g} {v:.1f}" for g, v in row.items()))
    out = REPO / "benchmarks" / "out" / "demo_mode2_statistics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"demo": str(root), "results": results}, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
