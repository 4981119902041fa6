"""B8 device serving (issue 23; docs/benchmarks.md#b8): `edgecl watch` vs torch eval on the same cores.

    .venv/bin/python benchmarks/b8_b9_floor/b8_serving.py [--bundle DIR] [--images 1000] [--threads 1,2]

EfficientNet-Lite0 at 64 px. watch: `Watcher.run(once=True)` on a folder of Fashion-MNIST PNGs,
image decoding, inference, unknown scores and the JSON log included (the review queue off); its
images/s is images / serve time, latency per image = its batch's wall time. torch: the recipe's
model in eval mode, channels_last, `torch.inference_mode`, forward only on pre-decoded tensors
(decoding not counted), the same batch size. Each run is its own process pinned with taskset to the
same cores (0 for 1 thread, 0-1 for 2), peak RSS by /usr/bin/time -v; --repeats interleaved runs per
side, the fastest reported (all are in the JSON, with the images per CPU-second of each serving loop,
which the other processes of a shared machine disturb less). Writes out/floor/b8_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.shared.common import (  # noqa: E402
    OUT,
    RECIPE,
    machine,
    print_table,
    run_timed,
    thread_env,
    write_json,
)
from edgecl.datasets import SEED, write_fashion_groups  # noqa: E402

WORKER = Path(__file__).with_name("b8_worker.py")


def prepare(images: int, bundle: Path | None) -> tuple[Path, Path, Path]:
    """(the camera's flat folder of ``images`` PNGs, the same images as class folders, the bundle):
    written once under out/floor/ and reused; without ``bundle``, one is exported there."""
    work = OUT / "floor"
    per_class = max(images // 10, 1)
    data = write_fashion_groups(work / f"b8-{per_class}", {"all": list(range(10))}, train_per_class=1,
                                test_per_class=per_class, seed=SEED)
    camera = work / f"b8-camera-{per_class}"
    if not camera.is_dir():  # the camera's flat folder
        camera.mkdir(parents=True)
        for i, p in enumerate(sorted((data / "all" / "test").rglob("*.png"))):
            (camera / f"{i:05d}.png").write_bytes(p.read_bytes())
    if bundle is None:
        bundle = work / "bundle-b8"
        if not (bundle / "manifest.json").exists():
            from edgecl.host.export import ExportOptions, export_bundle
            export_bundle(RECIPE, data / "all" / "train", bundle, options=ExportOptions(progress=False))
    return camera, data / "all" / "test", bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="a Lite0 64 px bundle (default: export one)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the fastest is reported")
    args = ap.parse_args()
    camera, flat_for_torch, bundle = prepare(args.images, args.bundle)
    load_before = os.getloadavg()
    rows, results = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        cores = "0" if threads == 1 else f"0-{threads - 1}"
        run: dict = {}
        for _ in range(args.repeats):  # interleaved; the fastest of each kind (a shared machine only slows runs down)
            for kind, folder in (("watch", camera), ("torch", flat_for_torch)):
                timed = run_timed(["taskset", "-c", cores, sys.executable, str(WORKER), kind, str(bundle),
                                   str(folder), str(threads), str(args.batch)], env=thread_env(threads))
                result = {**json.loads(timed.stdout.strip().splitlines()[-1]), "peak_rss_mib": timed.max_rss_mib,
                          "process_wall_s": timed.wall_s}
                run.setdefault(f"{kind}_all", []).append(result)
                if kind not in run or result["images_per_s"] > run[kind]["images_per_s"]:
                    run[kind] = result
        speedup = run["watch"]["images_per_s"] / run["torch"]["images_per_s"]
        rss = run["watch"]["peak_rss_mib"] / run["torch"]["peak_rss_mib"]
        results.append({"threads": threads, "cores": cores, "batch": args.batch, **run,
                        "speedup": speedup, "rss_ratio": rss, "goals": {"speedup>=1.3": speedup >= 1.3,
                                                                        "rss<=0.3": rss <= 0.3}})
        for kind in ("watch", "torch"):
            r = run[kind]
            every = " / ".join(f"{x['images_per_s']:.0f}" for x in run[f"{kind}_all"])
            rows.append([threads, kind, every, r["images_per_s"], r["images_per_cpu_s"], r["p50_ms"], r["p99_ms"],
                         r["peak_rss_mib"]])
        rows.append([threads, "watch / torch", "", speedup, "", "", "", rss])
    print_table(["threads", "run", "images/s (every run)", "best", "its images/CPU-s", "p50 ms", "p99 ms",
                 "peak RSS MiB"], rows)
    print("wrote", write_json("floor/b8_serving.json", {"benchmark": "B8", "machine": machine(),
                                                         "args": {k: str(v) for k, v in vars(args).items()},
                                                         "load_average_before": load_before,
                                                         "load_average_after": os.getloadavg(), "runs": results}))


if __name__ == "__main__":
    main()
