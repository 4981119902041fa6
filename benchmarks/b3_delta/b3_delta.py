"""B3: delta size and fidelity (docs/benchmarks.md#b3).

The B4 bundle (EfficientNet-Lite0, default 5% mask) is adapted on device A's images (classes 6-7)
with `edgecl adapt --no-gate` (B3 measures what a delta keeps, so the adaptation is always kept); then for each value encoding (fp32 / fp16 / int8 / int4):

  `edgecl delta --values V` -> bytes vs the base model's fp32 bytes (whole file, and the weight part
  without the class prototypes it also carries) -> `edgecl apply` -> `edgecl eval` of the new bundle,

against `edgecl eval` of the adapted device state itself, on the test images of the old classes
(0-5) and device A's classes (6-7). Goal: <= 1% of the base model's bytes, <= 0.2 points lost.

Run: .venv/bin/python benchmarks/b3_delta/b3_delta.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Run as `python benchmarks/b3_delta/b3_delta.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shared import common
from benchmarks.shared.bundles import device_profile, ensure_bundle, fleet_data
from edgecl.formats import delta as delta_format

ENCODINGS = ("fp32", "fp16", "int8", "int4")


def edgecl(*args: str) -> str:
    return common.run_timed([*common.edgecl_cmd(), *args]).stdout


def accuracy(bundle: Path, folders: list[Path]) -> float:
    correct = images = 0
    for folder in folders:
        # ncm on both sides: a delta carries the prototypes, not the device's LDA statistics, so a new
        # version starts with cosine prototypes (the device's default head would be lda, v2's ncm)
        out = edgecl("eval", str(bundle), "--data", str(folder), "--head", "ncm", "--json")
        r = json.loads(out[out.index("{"):])
        correct += int(r["correct"])
        images += int(r["images"])
    return 100.0 * correct / images


def main() -> None:
    ap = argparse.ArgumentParser(description="B3: delta bytes per encoding; accuracy after apply vs on device")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=200)
    args = ap.parse_args()

    data = fleet_data(args.train_per_class, args.test_per_class)
    base_bundle = ensure_bundle(args.size, args.train_per_class, args.test_per_class)
    work = common.OUT / "b3"
    common.clean(work)
    bundle = work / "bundle"
    shutil.copytree(base_bundle, bundle, ignore=shutil.ignore_patterns("state"))
    print(f"adapting {bundle} on device A's images ({args.epochs} epochs)", flush=True)
    edgecl("adapt", str(bundle), "--data", str(data / "device-a" / "train"), "--epochs", str(args.epochs),
           "--device", str(device_profile(args.threads)), "--no-gate", "--quiet")
    folders = [data / "calib" / "test", data / "device-a" / "test"]
    on_device = accuracy(bundle, folders)
    manifest = json.loads((bundle / "manifest.json").read_text())
    base_bytes = 4 * int(manifest["total_params"])
    print(f"on device: {on_device:.2f}% on classes 0-7", flush=True)

    rows = []
    for enc in ENCODINGS:
        path = work / f"delta-{enc}.safetensors"
        edgecl("delta", str(bundle), "-o", str(path), "--values", enc, "--device-id", "bench")
        header = delta_format.read_header(path)
        tensors = {name: info.end - info.begin for name, info in header.tensors.items()}
        weight_part = sum(b for n, b in tensors.items() if n.startswith("delta."))
        applied = work / f"applied-{enc}"
        apply_out = edgecl("apply", str(bundle), str(path), "-o", str(applied), "--overwrite")
        after = accuracy(applied, folders)
        d = delta_format.load_file(path)
        rows.append({"values": enc, "file_bytes": path.stat().st_size, "weight_tensor_bytes": weight_part,
                     "tensor_bytes": tensors, "changed": int(d.changed_positions().size), "delta_k": d.delta_k,
                     "file_vs_base_pct": 100 * path.stat().st_size / base_bytes,
                     "weights_vs_base_pct": 100 * weight_part / base_bytes,
                     "accuracy_after_apply": after, "accuracy_on_device": on_device,
                     "points_lost": on_device - after, "apply_output": apply_out.strip()})
        print(f"{enc}: {path.stat().st_size:,} B; after apply {after:.2f}%", flush=True)

    result = {"machine": common.machine(), "config": vars(args), "base_fp32_bytes": base_bytes,
              "total_params": manifest["total_params"], "selected": manifest["selected"], "rows": rows}
    print(f"\nB3 - EfficientNet-Lite0 {args.size} px, mask {manifest['selected']:,} of "
          f"{manifest['total_params']:,} ({100 * manifest['selected'] / manifest['total_params']:.1f}%), "
          f"base fp32 {base_bytes:,} B; accuracy on classes 0-7 test images")
    common.print_table(["values", "delta file B", "% of base", "weight part B", "% of base", "changed",
                        "acc on device %", "acc after apply %", "points lost"],
                       [[r["values"], f"{r['file_bytes']:,}", f"{r['file_vs_base_pct']:.2f}",
                         f"{r['weight_tensor_bytes']:,}", f"{r['weights_vs_base_pct']:.2f}", f"{r['changed']:,}",
                         f"{r['accuracy_on_device']:.2f}", f"{r['accuracy_after_apply']:.2f}",
                         f"{r['points_lost']:+.2f}"] for r in rows])
    common.write_json("b3_delta.json", result)
    _plot(result)


def _plot(result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["values"] for r in rows]
    a1.bar(names, [r["file_vs_base_pct"] for r in rows], label="whole file")
    a1.bar(names, [r["weights_vs_base_pct"] for r in rows], label="weight part", alpha=0.7)
    a1.axhline(1.0, color="k", ls="--", label="goal 1%")
    a1.set_ylabel("% of base fp32 bytes")
    a1.legend(fontsize=8)
    a2.bar(names, [r["points_lost"] for r in rows], color="tab:red")
    a2.axhline(0.2, color="k", ls="--", label="goal 0.2")
    a2.set_ylabel("points lost after apply")
    a2.legend(fontsize=8)
    fig.suptitle("B3 delta size and fidelity")
    fig.tight_layout()
    fig.savefig(common.OUT / "b3_delta.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
