"""B2: device adaptation cost (docs/benchmarks.md#b2), all methods side by side in ONE run.

Same model (EfficientNet-Lite0, BN folded, the bundle's weights), images (Fashion-MNIST classes 6-7,
device A's, cut to ``--steps`` full batches), batch (32 x 2 views), input size and thread count; each
measurement is its own process under `/usr/bin/time -v` (whole-process wall, CPU and peak RSS):

- ``edgecl`` : ``edgecl adapt --epochs 1 --no-gate`` on a copy of the bundle that ``edgecl export``
  wrote with the default mask policy (no-depthwise): `train_step.onnx` in a plain onnxruntime
  InferenceSession, numpy gate; threads from a device profile (``threads = N``); no torch in the
  process. s/step = median of the "seconds" of its step log (state/gen-*/steps.jsonl);
- ``full`` / ``channels_last`` / ``hooks`` : b2_torch_worker.py (torch full fine-tuning, the same in
  channels_last, the bundle's mask by gradient hooks), threads by OMP/MKL env + torch.set_num_threads;
- ``ortt`` : b2_ortt_worker.py, the format-1 onnxruntime-training step on the same bundle's model and
  mask, in its own virtualenv (``--ortt-python``; the row is left out when that Python is missing).

Every per-step time covers augmentation + forward + backward + update. Runs alternate: each repeat
does every thread count, each thread count every method in a rotated order; the tables quote medians
over repeats. The 1-minute load average is logged before each process (this machine is shared).
Goals: edgecl s/step <= 0.8x torch full FT and <= 1.0x torch channels_last; peak RSS <= 0.5x torch's.

Run: .venv/bin/python benchmarks/b2_device_cost/b2_device_cost.py [--threads 1,2] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

# Run as `python benchmarks/b2_device_cost/b2_device_cost.py`: the checkout's root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shared import common
from benchmarks.shared.bundles import fleet_data, recipe_for_size

HERE = Path(__file__).resolve().parent  # the workers run as scripts beside this one
WORK = common.OUT / "b2"
LABELS = {
    "edgecl": "edgecl adapt (train_step.onnx, plain onnxruntime)",
    "full": "torch full FT",
    "channels_last": "torch full FT, channels_last",
    "hooks": "torch, same mask by gradient hooks",
    "ortt": "onnxruntime-training 1.19.2 step (format 1)",
}
TORCH = ("full", "channels_last", "hooks")


def source_bundle(size: int, calib: Path) -> tuple[Path, dict]:
    """The bundle `edgecl export` writes with its defaults (mask policy no-depthwise), made once."""
    out = WORK / f"source-bundle-{size}px"
    info: dict = {"reused": True}
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("format_version") != 2 or m.get("mask_policy") != "no-depthwise" or m["input_size"] != [size, size]:
            shutil.rmtree(out)
    if not manifest.exists():
        recipe = common.RECIPE
        if size != 64:
            recipe = recipe_for_size(size)
        print(f"exporting {out}", flush=True)
        timed = common.run_timed([*common.edgecl_cmd(), "export", str(recipe), "--data", str(calib), "-o", str(out),
                                  "--overwrite", "--quiet"])
        info = {"reused": False, "wall_s": round(timed.wall_s, 1), "peak_rss_mib": round(timed.max_rss_mib)}
    m = json.loads(manifest.read_text())
    info |= {k: m[k] for k in ("selected", "total_params", "mask_policy", "batch_size", "created_utc")}
    info["versions"] = m.get("versions", {})
    return out, info


def task_subset(src: Path, images: int) -> Path:
    """The first images/n_classes images of each class of ``src`` (so every step is a full batch)."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    per_class = images // len(classes)
    out = WORK / f"task-{per_class * len(classes)}"
    if out.exists() and sum(1 for _ in out.rglob("*.png")) == per_class * len(classes):
        return out
    common.clean(out)
    for c in classes:
        files = sorted(c.glob("*.png"))[:per_class]
        if len(files) < per_class:
            raise SystemExit(f"{c} has {len(files)} images, {per_class} needed")
        (out / c.name).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, out / c.name / f.name)
    return out


def profile(threads: int, batch_size: int) -> Path:
    path = WORK / f"device-{threads}t.toml"
    path.write_text(f'name = "b2-{threads}-threads"\nthreads = {threads}\nbatch_size = {batch_size}\n'
                    "store_images = false\n")
    return path


def prepare_ortt(ortt_python: Path, bundle: Path) -> tuple[Path | None, str]:
    """Format-1 artifacts for the bundle's model and mask: forward graph here, gradient graph there."""
    if not ortt_python.exists():
        return None, f"{ortt_python} is missing (see b2_ortt_worker.py for the venv)"
    art = WORK / "ortt-artifacts"
    stamp = art / "bundle_mask_sha256"
    mask_sha = json.loads((bundle / "manifest.json").read_text())["mask_sha256"]
    if stamp.exists() and stamp.read_text() == mask_sha:
        return art, "reused"
    common.clean(art)
    worker = str(HERE / "b2_ortt_worker.py")
    forward = WORK / "ortt-forward.onnx"
    common.run_timed([sys.executable, worker, "export", "--bundle", str(bundle), "--out", str(forward)])
    common.run_timed([str(ortt_python), worker, "artifacts", "--forward", str(forward), "--out", str(art)])
    stamp.write_text(mask_sha)
    return art, "built"


def _cpu_s(stderr: str) -> float:
    user = re.search(r"User time \(seconds\): ([\d.]+)", stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", stderr)
    return float(user.group(1)) + float(system.group(1)) if user and system else float("nan")


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(method: str, threads: int, ctx: dict) -> dict:
    env = common.thread_env(threads)
    load = _load1()
    if method == "edgecl":
        work = WORK / "adapt-bundle"
        common.clean(work)
        shutil.copytree(ctx["bundle"], work, ignore=shutil.ignore_patterns("state"))
        timed = common.run_timed([*common.edgecl_cmd(), "adapt", str(work), "--data", str(ctx["task"]), "--device",
                                  str(profile(threads, ctx["batch_size"])), "--epochs", "1", "--batch-size",
                                  str(ctx["batch_size"]), "--no-gate", "--json", "--quiet"], env=env)
        logs = sorted((work / "state").glob("gen-*/steps.jsonl"))
        if len(logs) != 1:
            raise RuntimeError(f"expected one step log under {work / 'state'}, found {logs}")
        records = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
        step_s = [r["seconds"] for r in records]
        report = json.loads(timed.stdout[timed.stdout.index("{"):])
        extra = {"changed_fraction_mean": report["changed_fraction_mean"], "first_loss": records[0]["loss"],
                 "final_loss": report["final_loss"],
                 "report_step_s_median": report["step_seconds_median"], "report_peak_rss_mb": report["peak_rss_mb"]}
    else:
        if method == "ortt":
            cmd = [str(ctx["ortt_python"]), str(HERE / "b2_ortt_worker.py"), "run", "--bundle",
                   str(ctx["bundle"]), "--artifacts", str(ctx["ortt_artifacts"])]
        else:
            cmd = [sys.executable, str(HERE / "b2_torch_worker.py"), "--mode", method,
                   "--recipe", str(ctx["recipe"])]
            if method == "hooks":
                cmd += ["--mask", str(ctx["bundle"] / "mask.safetensors")]
        cmd += ["--data", str(ctx["task"]), "--steps", str(ctx["steps"]), "--batch-size", str(ctx["batch_size"]),
                "--threads", str(threads)]
        timed = common.run_timed(cmd, env=env)
        out = json.loads(timed.stdout.strip().splitlines()[-1])
        step_s = out["step_s"]
        extra = {"first_loss": out.get("first_loss"), "final_loss": out["final_loss"]}
    if len(step_s) != ctx["steps"]:
        raise RuntimeError(f"{method}: {len(step_s)} steps logged, {ctx['steps']} expected")
    return {"step_s": statistics.median(step_s), "step_s_all": step_s, "peak_rss_mib": timed.max_rss_mib,
            "wall_s": timed.wall_s, "cpu_s": _cpu_s(timed.stderr), "load1_before": load, **extra}


def summarize(runs: list[dict]) -> dict:
    return {"step_s_median": statistics.median(r["step_s"] for r in runs),
            "step_s_min": min(r["step_s"] for r in runs), "step_s_max": max(r["step_s"] for r in runs),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs),
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in runs), "repeats": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description="B2: edgecl adapt vs torch (and onnxruntime-training), s/step and RSS")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="steps per process (images = steps x batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--ortt-python", default="/tmp/ortt/bin/python",
                    help="Python of a venv with onnxruntime-training-cpu 1.19.2 (the row is skipped without it)")
    args = ap.parse_args()
    common.require_time_bin()
    threads = [int(t) for t in args.threads.split(",")]

    WORK.mkdir(parents=True, exist_ok=True)
    data = fleet_data(args.train_per_class, args.test_per_class)
    bundle, bundle_info = source_bundle(args.size, data / "calib" / "train")
    if bundle_info["batch_size"] != args.batch_size:
        raise SystemExit(f"the bundle's step graph is for batch {bundle_info['batch_size']}, not {args.batch_size}")
    task = task_subset(data / "device-a" / "train", args.steps * args.batch_size)
    recipe = common.RECIPE
    if args.size != 64:
        recipe = recipe_for_size(args.size)
    ortt_artifacts, ortt_note = prepare_ortt(Path(args.ortt_python), bundle)
    methods = ["edgecl", *TORCH] + (["ortt"] if ortt_artifacts else [])
    print(f"onnxruntime-training row: {ortt_note}", flush=True)
    ctx = {"bundle": bundle, "task": task, "steps": args.steps, "batch_size": args.batch_size, "recipe": recipe,
           "ortt_python": Path(args.ortt_python), "ortt_artifacts": ortt_artifacts}

    machine = common.machine()
    runs: dict[int, dict[str, list[dict]]] = {t: {m: [] for m in methods} for t in threads}
    turn = 0
    for r in range(args.repeats):
        for t in threads:
            order = methods[turn % len(methods):] + methods[:turn % len(methods)]  # rotate: no fixed position
            turn += 1
            for m in order:
                runs[t][m].append(measure(m, t, ctx))
            print(f"repeat {r + 1}/{args.repeats}, {t} thread(s): " + "; ".join(
                f"{m} {runs[t][m][-1]['step_s']:.3f} s/step {runs[t][m][-1]['peak_rss_mib']:.0f} MiB "
                f"(load {runs[t][m][-1]['load1_before']:.1f})" for m in order), flush=True)

    summary: dict[str, dict] = {}
    for t in threads:
        s = {m: summarize(v) for m, v in runs[t].items()}
        for m in s:
            for ref in TORCH:
                s[m][f"step_vs_{ref}"] = s[m]["step_s_median"] / s[ref]["step_s_median"]
                s[m][f"rss_vs_{ref}"] = s[m]["peak_rss_mib_median"] / s[ref]["peak_rss_mib_median"]
        e = s["edgecl"]
        goals = {"step <= 0.8x torch full FT": e["step_vs_full"] <= 0.8,
                 "step <= 1.0x torch channels_last": e["step_vs_channels_last"] <= 1.0,
                 "peak RSS <= 0.5x torch full FT": e["rss_vs_full"] <= 0.5,
                 "peak RSS <= 0.5x every torch variant": all(e[f"rss_vs_{ref}"] <= 0.5 for ref in TORCH)}
        loads = [r["load1_before"] for v in runs[t].values() for r in v]
        summary[str(t)] = {"methods": s, "goals": goals,
                           "load1": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}}
        print(f"\nB2 - {args.size} px, batch {args.batch_size} x 2 views, {t} thread(s), {args.steps} steps per "
              f"process, medians of {args.repeats}; load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
        common.print_table(
            ["process", "s/step", "x full", "x chl", "x hooks", "peak RSS MiB", "x full", "CPU s", "wall s"],
            [[LABELS[m], f"{x['step_s_median']:.3f}", f"{x['step_vs_full']:.2f}", f"{x['step_vs_channels_last']:.2f}",
              f"{x['step_vs_hooks']:.2f}", f"{x['peak_rss_mib_median']:.0f}", f"{x['rss_vs_full']:.2f}",
              f"{x['cpu_s_median']:.1f}", f"{x['wall_s_median']:.1f}"] for m, x in s.items()])
        print("goals: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))

    result = {"machine": machine, "labels": {m: LABELS[m] for m in methods},
              "config": vars(args) | {"threads": threads, "images": args.steps * args.batch_size, "task": str(task),
                                      "bundle": str(bundle), "bundle_info": bundle_info, "ortt": ortt_note},
              "summary": summary, "runs": {str(t): v for t, v in runs.items()}}
    common.write_json("b2_device_cost.json", result)
    _plot(result)


def _plot(result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    threads = list(result["summary"])
    methods = list(result["labels"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        x = np.arange(len(threads)) + (i - (len(methods) - 1) / 2) * width
        a1.bar(x, [result["summary"][t]["methods"][m]["step_s_median"] for t in threads], width,
               label=result["labels"][m])
        a2.bar(x, [result["summary"][t]["methods"][m]["peak_rss_mib_median"] for t in threads], width)
    for ax, ylabel in ((a1, "s / step (median)"), (a2, "peak RSS MiB (whole process)")):
        ax.set_xticks(range(len(threads)), [f"{t} thread(s)" for t in threads])
        ax.set_ylabel(ylabel)
    a1.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"B2 {c['size']} px, batch {c['batch_size']}x2, {c['steps']} steps, medians of {c['repeats']} "
                 f"(shared machine, {result['machine']['date_utc']})")
    fig.tight_layout()
    fig.savefig(common.OUT / "b2_device_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
