"""B4: host export cost (docs/benchmarks.md#b4).

`edgecl export` of the real EfficientNet-Lite0 recipe on calibration images (Fashion-MNIST classes
0-5, the classes the model "had before" in the demo): wall time and whole-process peak RSS
(`/usr/bin/time -v`), MI-Fisher scoring included, and each artifact's bytes vs the base model's
fp32 bytes. The bundle it writes is reused by B2 and B3.

Run: .venv/bin/python benchmarks/b4_export/b4_export.py [--size 64] [--train-per-class 200] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Run as `python benchmarks/b4_export/b4_export.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shared import common
from benchmarks.shared.bundles import bundle_path, fleet_data, recipe_for_size


def main() -> None:
    ap = argparse.ArgumentParser(description="B4: edgecl export wall time, peak RSS, artifact bytes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    data = fleet_data(args.train_per_class, args.test_per_class)
    recipe = recipe_for_size(args.size)
    out = bundle_path(args.size)
    runs = []
    for i in range(args.repeats):
        cmd = [*common.edgecl_cmd(), "export", str(recipe), "--data", str(data / "calib" / "train"),
               "-o", str(out), "--overwrite"]
        print(f"run {i + 1}/{args.repeats}: {' '.join(cmd)}", flush=True)
        timed = common.run_timed(cmd)
        runs.append({"wall_s": timed.wall_s, "peak_rss_mib": timed.max_rss_mib})
        print(f"  {timed.wall_s:.1f} s, peak RSS {timed.max_rss_mib:.0f} MiB", flush=True)

    manifest = json.loads((out / "manifest.json").read_text())
    base_bytes = 4 * int(manifest["total_params"])  # fp32 weights of the embedding model
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    calib_images = sum(1 for _ in (data / "calib" / "train").rglob("*.png"))
    result = {
        "machine": common.machine(), "recipe": str(recipe), "size": args.size, "calibration_images": calib_images,
        "runs": runs, "wall_s_median": statistics.median(r["wall_s"] for r in runs),
        "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs),
        "total_params": manifest["total_params"], "selected": manifest["selected"],
        "base_fp32_bytes": base_bytes, "files": files, "bundle_bytes": sum(files.values()),
        "bundle": str(out),
    }
    print(f"\nB4 - edgecl export, EfficientNet-Lite0 {args.size} px, {calib_images} calibration images, "
          f"{args.repeats} run(s)")
    common.print_table(["what", "value"], [
        ["wall time (median)", f"{result['wall_s_median']:.1f} s"],
        ["peak RSS (median)", f"{result['peak_rss_mib_median']:.0f} MiB"],
        ["parameters / selected", f"{manifest['total_params']:,} / {manifest['selected']:,} "
                                  f"({100 * manifest['selected'] / manifest['total_params']:.2f}%)"],
        ["base model fp32 bytes", f"{base_bytes:,}"],
    ])
    common.print_table(["artifact", "bytes", "x base fp32"],
                       [[n, f"{b:,}", f"{b / base_bytes:.3f}"] for n, b in files.items()]
                       + [["bundle total", f"{result['bundle_bytes']:,}", f"{result['bundle_bytes'] / base_bytes:.3f}"]])
    common.write_json("b4_export.json", result)
    _plot(result)


def _plot(result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["files"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, [result["files"][n] / 2**20 for n in names])
    ax.axvline(result["base_fp32_bytes"] / 2**20, color="k", ls="--", label="base model fp32")
    ax.set_xlabel("MiB")
    ax.set_title(f"B4 bundle artifacts ({result['size']} px); export {result['wall_s_median']:.0f} s, "
                 f"peak {result['peak_rss_mib_median']:.0f} MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(common.OUT / "b4_export.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
