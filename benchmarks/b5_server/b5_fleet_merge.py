"""B5 at fleet scale (docs/benchmarks.md#b5): the server's merge of 1,000 and 10,000 deltas shaped
like EfficientNet-Lite0's at the 5% mask (K = 167,505 selected elements, 30% of them changed, int8
values, ten 1280-dim prototypes), per strategy: time and peak RSS.

The deltas are stored once in a real store (SQLite + folder, the server's own put_delta), then each
strategy runs in a fresh process through the server's merge (``service.run_merge``: plan, then the
streaming merge over the stored blobs, sign, store), so its peak RSS is the merge's own.
``--in-memory`` also times the pre-streaming path (every delta decoded, then ``merge_deltas``), for
reference at 1,000 only (it holds every delta at once).

    .venv/bin/python benchmarks/b5_server/b5_fleet_merge.py --devices 1000 [--devices 10000] [--in-memory]

Writes benchmarks/results/b5_fleet_merge-<devices>.json. No torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgecl.formats import delta as D  # noqa: E402
from edgecl.formats.mask import Mask  # noqa: E402
from edgecl.formats.merge import STRATEGIES as MERGE_STRATEGIES  # noqa: E402
from edgecl.formats.prototypes import Prototypes  # noqa: E402

K_LITE0 = 167_505                # EfficientNet-Lite0's selected elements at the 5% mask
EMBED_DIM = 1280
CLASSES = [f"class-{i}" for i in range(10)]
STRATEGIES = tuple(MERGE_STRATEGIES)             # every strategy the server offers
WORK = REPO / "benchmarks" / "out" / "b5_fleet"
RESULTS = REPO / "benchmarks" / "results"


def make_bundle(k: int, n_tensors: int = 40, seed: int = 7) -> tuple[Mask, bytes, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    order = [f"blocks.{i}.conv.weight" for i in range(n_tensors)]
    per = [k // n_tensors + (1 if i < k % n_tensors else 0) for i in range(n_tensors)]
    sizes = {n: p * 20 for n, p in zip(order, per, strict=True)}
    indices = {n: np.sort(rng.choice(sizes[n], p, replace=False)).astype(np.int32)
               for n, p in zip(order, per, strict=True)}
    mask = Mask(order=order, shapes={n: (sizes[n],) for n in order}, indices=indices, total_params=sum(sizes.values()))
    mask_bytes = mask.to_bytes()
    manifest = {"bundle_id": "b5-fleet", "version": 1, "model_name": "b5", "input_size": [224, 224],
                "mean": [0.5] * 3, "std": [0.5] * 3, "embedding_dim": EMBED_DIM, "proj_dim": 128,
                "total_params": mask.total_params, "selected": mask.total_selected, "select_rate": 0.05,
                "drop_rate": 0.9, "base_sha256": hashlib.sha256(b"b5 base").hexdigest(),
                "mask_sha256": hashlib.sha256(mask_bytes).hexdigest()}
    return mask, mask_bytes, manifest


def make_delta_bytes(manifest: dict, device: str, seed: int, changed: float) -> bytes:
    rng = np.random.default_rng(seed)
    k = manifest["selected"]
    vector = np.where(rng.random(k) < changed, rng.normal(0, 1e-3, k), 0).astype(np.float32)
    protos = Prototypes(list(CLASSES), rng.normal(size=(len(CLASSES), EMBED_DIM)).astype(np.float32),
                        rng.integers(20, 300, len(CLASSES)))
    delta = D.Delta.from_dense(vector, bundle_id=manifest["bundle_id"], bundle_version=1,
                               base_sha256=manifest["base_sha256"], mask_sha256=manifest["mask_sha256"],
                               device_id=device, steps=100, samples_seen=int(rng.integers(100, 3000)),
                               metrics={"acc": 0.9}, created_utc="2025-06-01T00:00:00Z", prototypes=protos)
    return D.save(delta, bytes(32), values="int8")


def build_store(devices: int, changed: float) -> Path:
    """A store holding one bundle and ``devices`` devices' deltas (reused when already complete)."""
    from edgecl.server.service import register_bundle_json
    from edgecl.server.store import Store

    folder = WORK / f"store-{devices}"
    done = folder / "complete.json"
    if done.exists() and json.loads(done.read_text()).get("changed") == changed:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    store = Store(folder)
    _, mask_bytes, manifest = make_bundle(K_LITE0)
    register_bundle_json(store, manifest, mask_bytes)
    started = time.perf_counter()
    for i in range(devices):
        data = make_delta_bytes(manifest, f"dev-{i:05d}", seed=i, changed=changed)
        store.put_delta(data, hashlib.sha256(data).hexdigest(), {
            "bundle_id": manifest["bundle_id"], "version": 1, "device": f"dev-{i:05d}", "steps": 100,
            "samples_seen": D.read_header(data).samples_seen, "values_dtype": "int8",
            "created_utc": "2025-06-01T00:00:00Z"})
        if (i + 1) % 1000 == 0:
            print(f"  stored {i + 1} deltas ({time.perf_counter() - started:.0f} s)", flush=True)
    store.close()
    done.write_text(json.dumps({"devices": devices, "changed": changed}) + "\n")
    return folder


def merge_once(folder: Path, strategy: str, in_memory: bool) -> dict[str, Any]:
    """In this (fresh) process: one merge; its time and this process's peak RSS."""
    from edgecl.server.service import MergeRequest, run_merge
    from edgecl.server.store import Store

    store = Store(folder)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    if in_memory:
        from edgecl.formats.merge import MergeOptions, merge_deltas

        rows = [r for r in store.list_deltas("b5-fleet", 1) if r["device"] != D.MERGE_DEVICE_ID]
        deltas = [D.load(store.get_blob(r["sha256"]) or b"") for r in rows]
        mask = Mask.from_bytes(store.get_blob(store.get_bundle("b5-fleet", 1).mask_sha256) or b"")  # type: ignore[union-attr]
        out = merge_deltas(deltas, mask, options=MergeOptions(strategy=strategy))
        answer = {"inputs": len(out.devices), "changed": int(out.delta.positions.size)}
    else:
        answer = run_merge(store, "b5-fleet", 1, MergeRequest(strategy=strategy))
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds too: on a machine shared with other jobs the wall time depends on their load.
    cpu_seconds = usage.ru_utime + usage.ru_stime - cpu_before
    return {"strategy": strategy, "cpu_seconds": cpu_seconds, "path": "in-memory merge_deltas" if in_memory else "server run_merge (streaming)",
            "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_merge_bytes": rss_before, "inputs": answer["inputs"], "changed": answer["changed"],
            "sha256": answer.get("sha256", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, action="append", help="deltas to merge (repeatable; default 1000)")
    parser.add_argument("--changed", type=float, default=0.3, help="share of the K entries a device changed")
    parser.add_argument("--strategy", action="append", choices=STRATEGIES, help="default: every strategy")
    parser.add_argument("--in-memory", action="store_true", help="also time merge_deltas with every delta in memory")
    parser.add_argument("--one", nargs=3, metavar=("STORE", "STRATEGY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(merge_once(Path(args.one[0]), args.one[1], args.one[2] == "in-memory")))
        return
    for devices in args.devices or [1000]:
        print(f"B5 fleet merge: {devices} deltas, K={K_LITE0}, {args.changed:.0%} changed, int8", flush=True)
        started = time.perf_counter()
        folder = build_store(devices, args.changed)
        setup_s = time.perf_counter() - started
        runs = []
        for strategy in args.strategy or STRATEGIES:
            for path in (["streaming", "in-memory"] if args.in_memory else ["streaming"]):
                proc = subprocess.run([sys.executable, __file__, "--one", str(folder), strategy, path],
                                      capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    runs.append({"strategy": strategy, "path": path, "error": proc.stderr[-2000:]})
                    print(f"  {strategy} {path}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    continue
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(f"  {strategy:<14} {path:<10} {run['seconds']:8.1f} s ({run['cpu_seconds']:.1f} s CPU)  peak RSS "
                      f"{run['peak_rss_bytes'] / 2**20:7.0f} MiB", flush=True)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        result = {"devices": devices, "k": K_LITE0, "changed": args.changed, "values": "int8",
                  "setup_s": setup_s, "runs": runs, "load_average_after": load,
                  "machine": {"cores": __import__("os").cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version(), "numpy": np.__version__,
                              "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        RESULTS.mkdir(parents=True, exist_ok=True)
        # A run of some strategies only is its own file: it never overwrites the run of all of them.
        part = "" if not args.strategy else "-" + "-".join(args.strategy)
        out = RESULTS / f"b5_fleet_merge-{devices}{part}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
