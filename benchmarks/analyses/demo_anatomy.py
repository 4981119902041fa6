"""Why the demo's merged v2 does not beat the frozen baseline on every device's classes (issue 12).

Reads the folder a finished `edgecl demo --out DIR` left (its data, bundle v1, device A's delta, bundle v2)
and measures, each number from real bundles through onnxruntime:

1. the backbone, apart from where prototypes were put: every class's exact prototype (the mean of all
   its training images under that bundle's backbone, cosine NCM over the 10 classes) for v1 (= the
   frozen baseline), v2, and the versions below;
2. device B without the do-no-harm gate: `edgecl adapt --no-gate` on a copy of v1 with B's images,
   `edgecl eval` on the old classes and B's, `edgecl delta --values int4`;
3. what B's adaptation does to classes B never saw: v1 + B's delta alone (`edgecl apply`), and v1 + A's
   and B's deltas merged (`edgecl apply` of both, weighted mean), each with the prototypes it ships and
   with exact ones.

Run: .venv/bin/python benchmarks/analyses/demo_anatomy.py demo-out   (about 10 minutes on 2 cores)
Writes benchmarks/out/demo_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Run as `python benchmarks/analyses/demo_anatomy.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from benchmarks.shared import common

GROUPS = ("calib", "device-a", "device-b")
KEY = "ab" * 32  # any 64-hex key: the delta is only applied here, never pushed


def edgecl(*args: str) -> str:
    return common.run_timed([*common.edgecl_cmd(), *args]).stdout


def shipped(bundle: Path, data: Path, groups: tuple[str, ...] = GROUPS) -> dict[str, float | None]:
    """`edgecl eval --head ncm` per group, with the prototypes the bundle holds (None: it holds none of
    that group's classes, e.g. v1 + B's delta knows nothing of A's)."""
    from edgecl.device.state import load_current, open_bundle

    known = set(load_current(open_bundle(bundle)).prototypes.classes)  # what `edgecl eval` scores with
    out: dict[str, float | None] = {}
    for g in groups:
        if not known & {p.name for p in (data / g / "test").iterdir()}:
            out[g] = None
            continue
        text = edgecl("eval", str(bundle), "--data", str(data / g / "test"), "--head", "ncm", "--json")
        r = json.loads(text[text.index("{"):])
        out[g] = round(100 * r["accuracy"], 1)
    return out


def exact(bundle: Path, data: Path) -> dict[str, float]:
    """Cosine NCM with every class's mean over all its training images under this bundle's backbone."""
    from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
    from edgecl.device.state import open_bundle
    from edgecl.formats.images import load_image_folder

    b = open_bundle(bundle)
    runner = create_runner(b, resolve_profile(None, b))
    zero = np.zeros(b.mask.total_selected, np.float32)

    def embed(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        images = load_image_folder(folder, b.manifest.input_size, progress=False)
        e = embed_and_score(runner, b, images.pixels, zero)[0]
        return e / np.linalg.norm(e, axis=1, keepdims=True), np.array([images.classes[y] for y in images.labels])

    means: dict[str, np.ndarray] = {}
    for g in GROUPS:
        e, y = embed(data / g / "train")
        means.update({c: e[y == c].mean(0) for c in np.unique(y)})
    names = sorted(means)
    protos = np.stack([means[c] / np.linalg.norm(means[c]) for c in names])
    out = {}
    for g in GROUPS:
        e, y = embed(data / g / "test")
        out[g] = round(100 * float((np.array(names)[np.argmax(e @ protos.T, 1)] == y).mean()), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", type=Path, help="the folder of a finished `edgecl demo --out DIR`")
    args = ap.parse_args()
    demo = args.demo_out.resolve()
    data, v1, v2 = demo / "data", demo / "bundle-v1", demo / "bundle-v2"
    delta_a = demo / "device-a" / "delta.safetensors"
    for path in (data, v1, v2, delta_a):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `edgecl demo --out {demo}` to the end first")
    work = common.OUT / "demo_anatomy"
    common.clean(work)
    work.mkdir(parents=True)

    # 2. device B without the gate
    b_bundle = work / "device-b-no-gate"
    shutil.copytree(v1, b_bundle)
    text = edgecl("adapt", str(b_bundle), "--data", str(data / "device-b" / "train"), "--device",
                  str(demo / "device.toml"), "--no-gate", "--json")
    b_report = json.loads(text[text.index("{"):])
    b_eval = shipped(b_bundle, data, ("calib", "device-b"))
    delta_b = work / "device-b-no-gate.safetensors"
    edgecl("delta", str(b_bundle), "-o", str(delta_b), "--values", "int4", "--device-id", "device-b", "--key", KEY)

    # 3. B's delta alone, and merged with A's
    b_alone, merged = work / "v1+b", work / "v1+a+b"
    edgecl("apply", str(v1), str(delta_b), "-o", str(b_alone), "--overwrite", "--quiet")
    edgecl("apply", str(v1), str(delta_a), str(delta_b), "-o", str(merged), "--overwrite", "--quiet")

    # the demo's like-for-like baseline: v1 given every class's prototypes, no training
    versions = {"v1 (frozen baseline)": demo / "baseline" / "bundle", "v2 (demo: A's delta, B refused)": v2,
                "v1 + B's no-gate delta": b_alone, "v1 + A's and B's no-gate deltas": merged}
    table = {name: {"shipped": shipped(path, data), "exact": exact(path, data)} for name, path in versions.items()}
    result = {"command": f"benchmarks/analyses/demo_anatomy.py {args.demo_out}", "machine": common.machine(),
              "device_b_no_gate": {"eval": b_eval, "steps": b_report["steps"], "epochs": b_report["epochs"]},
              "versions": table}
    path = common.write_json("demo_anatomy.json", result)
    print(f"device B without the gate: old {b_eval['calib']}, B's {b_eval['device-b']}")
    print(f"{'version':<36} {'prototypes':<9} " + " ".join(f"{g:>9}" for g in GROUPS))
    for name, row in table.items():
        for kind, acc in row.items():
            print(f"{name:<36} {kind:<9} " + " ".join(f"{acc[g]:>9.1f}" if acc[g] is not None else f"{'-':>9}"
                                                      for g in GROUPS))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
