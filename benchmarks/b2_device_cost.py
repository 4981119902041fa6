"""B2: device adaptation cost (BENCHMARKS.md B2).

Same model (EfficientNet-Lite0, BN folded), images (Fashion-MNIST classes 6-7, device A's), batch
(32 x 2 views), input size and thread count, each in its own process under `/usr/bin/time -v`:

- ``edgecl adapt`` (the standard-ONNX step graph in plain onnxruntime, numpy gate; no torch in the
  process), one epoch;
- torch full fine-tuning (b2_torch_worker.py --mode full), as many steps;
- torch with the bundle's mask applied by gradient hooks (--mode hooks).

Seconds per step = median of the per-step times each process logs (augmentation + forward +
backward + update); peak RSS = whole process. Runs alternate (edgecl, full, hooks) x repeats and
the table quotes medians. Goal: step time <= torch full FT; peak RSS <= 0.6x of it.

Run: .venv/bin/python benchmarks/b2_device_cost.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys

import common
from b4_export import bundle_path, device_profile, fleet_data, recipe_for_size


def ensure_bundle(size: int, train_per_class: int, test_per_class: int):  # noqa: ANN201
    out = bundle_path(size)
    if not (out / "manifest.json").exists():
        data = fleet_data(train_per_class, test_per_class)
        print(f"exporting {out} (B4 writes it; running the export first)", flush=True)
        common.run_timed([*common.edgecl_cmd(), "export", str(recipe_for_size(size)), "--data",
                          str(data / "calib" / "train"), "-o", str(out), "--overwrite"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="B2: edgecl adapt vs torch, step time and peak RSS")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=200)
    args = ap.parse_args()

    data = fleet_data(args.train_per_class, args.test_per_class)
    task = data / "device-a" / "train"
    bundle = ensure_bundle(args.size, args.train_per_class, args.test_per_class)
    profile = device_profile(args.threads, args.batch_size)
    images = sum(1 for _ in task.rglob("*.png"))
    steps = math.ceil(images / args.batch_size)
    env = common.thread_env(args.threads)
    worker = [sys.executable, str(common.BENCH_DIR / "b2_torch_worker.py"), "--data", str(task),
              "--recipe", str(recipe_for_size(args.size)), "--steps", str(steps), "--batch-size",
              str(args.batch_size), "--threads", str(args.threads)]
    rows: dict[str, list[dict]] = {"edgecl adapt (onnxruntime)": [], "torch full FT": [], "torch mask by hooks": []}
    for r in range(args.repeats):
        work = common.OUT / "b2-bundle"
        common.clean(work)
        shutil.copytree(bundle, work, ignore=shutil.ignore_patterns("state"))
        timed = common.run_timed([*common.edgecl_cmd(), "adapt", str(work), "--data", str(task), "--device",
                                  str(profile), "--epochs", "1", "--batch-size", str(args.batch_size),
                                  "--json", "--quiet"], env=env)
        report = json.loads(timed.stdout[timed.stdout.index("{"):])
        rows["edgecl adapt (onnxruntime)"].append({"step_s": report["step_seconds_median"], "steps": report["steps"],
                                                   "peak_rss_mib": timed.max_rss_mib, "wall_s": timed.wall_s,
                                                   "changed_fraction_mean": report["changed_fraction_mean"]})
        for label, mode in (("torch full FT", "full"), ("torch mask by hooks", "hooks")):
            extra = ["--mask", str(bundle / "mask.safetensors")] if mode == "hooks" else []
            timed = common.run_timed([*worker, "--mode", mode, *extra], env=env)
            out = json.loads(timed.stdout.strip().splitlines()[-1])
            rows[label].append({"step_s": out["step_s_median"], "steps": out["steps"],
                                "peak_rss_mib": timed.max_rss_mib, "wall_s": timed.wall_s})
        print(f"repeat {r + 1}/{args.repeats}: " + "; ".join(
            f"{k}: {v[-1]['step_s']:.3f} s/step, {v[-1]['peak_rss_mib']:.0f} MiB" for k, v in rows.items()), flush=True)

    summary = {k: {"step_s_median": statistics.median(x["step_s"] for x in v),
                   "peak_rss_mib_median": statistics.median(x["peak_rss_mib"] for x in v),
                   "wall_s_median": statistics.median(x["wall_s"] for x in v), "runs": v} for k, v in rows.items()}
    full = summary["torch full FT"]
    for s in summary.values():
        s["step_vs_full"] = s["step_s_median"] / full["step_s_median"]
        s["rss_vs_full"] = s["peak_rss_mib_median"] / full["peak_rss_mib_median"]
    result = {"machine": common.machine(), "config": vars(args) | {"steps": steps, "images": images,
                                                                  "bundle": str(bundle)}, "summary": summary}
    print(f"\nB2 - {args.size} px, batch {args.batch_size} x 2 views, {args.threads} threads, {steps} steps, "
          f"medians of {args.repeats}")
    common.print_table(["process", "s/step", "x full FT", "peak RSS MiB", "x full FT", "process wall s"],
                       [[k, f"{s['step_s_median']:.3f}", f"{s['step_vs_full']:.2f}", f"{s['peak_rss_mib_median']:.0f}",
                         f"{s['rss_vs_full']:.2f}", f"{s['wall_s_median']:.1f}"] for k, s in summary.items()])
    common.write_json("b2_device_cost.json", result)
    _plot(result)


def _plot(result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.bar(names, [result["summary"][n]["step_s_median"] for n in names])
    a1.set_ylabel("s / step (median)")
    a2.bar(names, [result["summary"][n]["peak_rss_mib_median"] for n in names], color="tab:orange")
    a2.set_ylabel("peak RSS MiB (whole process)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7)
    c = result["config"]
    fig.suptitle(f"B2 {c['size']} px, batch {c['batch_size']}x2, {c['threads']} threads")
    fig.tight_layout()
    fig.savefig(common.OUT / "b2_device_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
