"""B8 worker: one serving run in its own process (so its peak RSS is its own). Prints one JSON line.

    b8_worker.py watch BUNDLE DIR THREADS BATCH      # edgecl watch --once (decode + inference + log)
    b8_worker.py torch BUNDLE DIR THREADS BATCH      # torch eval, channels_last, forward only (pre-decoded)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def watch(bundle: str, folder: str, threads: int, batch: int) -> dict:
    import numpy as np

    from edgecl.device.watch import Watcher, WatchOptions
    from edgecl.formats.config import DeviceProfile

    profile = DeviceProfile(name="b8", threads=threads)
    opts = WatchOptions(batch_size=batch, settle_s=0.0, poll_s=0.01, queue=False, stats_every_s=1e9)
    watcher = Watcher(bundle, folder, opts, profile=profile, log=os.devnull)
    watcher.files.scan()  # first sight (the camera's files are all complete)
    t0, c0 = time.perf_counter(), time.process_time()
    report = watcher.run(once=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    lat = np.asarray(report.latencies_ms)
    return {"images": report.images, "serve_s": report.seconds, "wall_s": wall, "cpu_s": cpu,
            "images_per_cpu_s": report.images / cpu,
            "images_per_s": report.images / report.seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def torch_eval(bundle: str, folder: str, threads: int, batch: int) -> dict:
    import numpy as np
    import torch

    from edgecl.formats import manifest as mf
    from edgecl.formats.config import load_recipe
    from edgecl.formats.images import load_image_folder, normalize
    from edgecl.host.model import build_embedding_model

    torch.set_num_threads(threads)
    m = mf.load_manifest(Path(bundle))
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "models" / "efficientnet_lite0.toml")
    model = build_embedding_model(recipe).eval().to(memory_format=torch.channels_last)
    pixels = load_image_folder(folder, m.input_size, m.interpolation).pixels
    x = torch.from_numpy(normalize(pixels, m.mean, m.std)).contiguous(memory_format=torch.channels_last)
    lat = []
    with torch.inference_mode():
        model(x[:batch])  # warm-up, as watch's session build is outside its serve time too
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(x), batch):
            s = time.perf_counter()
            model(x[i:i + batch])
            lat += [1000 * (time.perf_counter() - s)] * len(x[i:i + batch])
        forward_s, cpu = time.perf_counter() - t0, time.process_time() - c0
    lat_a = np.asarray(lat)
    return {"images": len(x), "serve_s": forward_s, "images_per_s": len(x) / forward_s, "cpu_s": cpu,
            "images_per_cpu_s": len(x) / cpu,
            "p50_ms": float(np.percentile(lat_a, 50)), "p99_ms": float(np.percentile(lat_a, 99))}


if __name__ == "__main__":
    kind, bundle, folder, threads, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    result = (watch if kind == "watch" else torch_eval)(bundle, folder, threads, batch)
    print(json.dumps(result))
