"""Downlink of a gate-made v2 of the real EfficientNet-Lite0 (issue 22: goal <= 100 kB on the wire).

    .venv/bin/python benchmarks/b5_server/downlink_lite0.py --out /tmp/downlink-lite0 [--epochs 2] [--devices 1] [--no-device-gate]

The fleet loop through the CLI on loopback, small so it runs in minutes on 2 cores: Fashion-MNIST
(`make data`), `edgecl export` of the real Lite0 at 64 px on 40 images x 6 classes, each device adapts
on 40 images x 2 new classes and pushes an int4 delta (as `make demo`'s devices do), `edgecl release`
merges and gates v2 (the devices answer its statistics round with `edgecl restat`, then `--finish`
publishes; the weights patch is made at release time), and device-a runs `edgecl pull --json`.
Prints one JSON object: the pull's bytes on the wire per file (``patched``: the weights as the
release's patch; ``derived``: the mask made on the device from it), what changed, the release
check's accuracies, and the merge's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgecl.datasets import DEMO_GROUPS, write_fashion_groups
from edgecl.demo import Runner, _parse_registration, edgecl_cmd, free_port, wait_healthy

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/downlink-lite0"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs each device adapts")
    parser.add_argument("--devices", type=int, default=1, choices=(1, 2))
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--tolerance", type=float, default=0.0, help="the release gate's tolerance")
    parser.add_argument("--no-device-gate", action="store_true",
                        help="devices keep their adapted weights even when their do-no-harm gate would keep "
                             "prototypes only (so v2 moves weights: the case the weights patch is for)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    run = Runner(lambda line: print(line, file=sys.stderr), env)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    data = write_fashion_groups(out / "data", DEMO_GROUPS, train_per_class=args.per_class, test_per_class=20,
                                val_per_class=20, overwrite=True)
    check = out / "release-check"
    shutil.rmtree(check, ignore_errors=True)
    for group in DEMO_GROUPS:
        for folder in sorted((data / group / "val").iterdir()):
            shutil.copytree(folder, check / folder.name)
    v1 = out / "bundle-v1"
    if not (v1 / "manifest.json").exists():
        run("export", str(REPO / "models" / "efficientnet_lite0.toml"), "--data", str(data / "calib" / "train"),
            "-o", str(v1), "--overwrite", "-q")
    timings["export_s"] = time.perf_counter() - t
    manifest = json.loads((v1 / "manifest.json").read_text())
    profile = out / "device.toml"
    profile.write_text('name = "downlink-device"\nthreads = 2\nbatch_size = 32\n')

    store = out / "server"
    shutil.rmtree(store, ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(out / "server.log", "w") as log:
        server = subprocess.Popen([*edgecl_cmd(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--store", str(store), "--log-level", "warning"], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, server)
        devices = ["device-a", "device-b"][:args.devices]
        creds = {d: _parse_registration(run("server", "device", "add", d, "--store", str(store))) for d in devices}
        operator, _ = _parse_registration(run("server", "device", "add", "operator", "--admin", "--store", str(store)))
        server_key = run("server", "key", "--store", str(store)).strip()
        run("server", "bundle", "add", str(v1), "--store", str(store))
        deltas = {}
        t = time.perf_counter()
        for device in devices:
            bundle = out / device / "bundle"
            shutil.rmtree(bundle.parent, ignore_errors=True)
            shutil.copytree(v1, bundle)
            run("adapt", str(bundle), "--data", str(data / device / "train"), "--device", str(profile),
                "--epochs", str(args.epochs), "-q", *(["--no-gate"] if args.no_device_gate else []))
            delta = out / device / "delta.safetensors"
            token, key = creds[device]
            run("delta", str(bundle), "-o", str(delta), "--values", "int4", "--device-id", device, "--key", key)
            run("push", str(delta), "--server", url, "--token", token)
            deltas[device] = delta.stat().st_size
        timings["devices_s"] = time.perf_counter() - t
        t = time.perf_counter()
        shutil.rmtree(out / "release", ignore_errors=True)    # no bundle of an earlier run is taken for v2
        released = run.json("release", manifest["bundle_id"], "--heldout", str(check), "--server", url, "--token",
                            operator, "--bundle", str(v1), "--work", str(out / "release"), "--json",
                            "--tolerance", str(args.tolerance), ok=(0, 2))
        if released.get("stage") == "candidate":
            # The statistics round (docs/server.md): each device re-embeds what it holds under the
            # candidate and sends its classes' statistics; --finish sums them, judges and publishes v2.
            for device in devices:
                token, key = creds[device]
                run.json("restat", str(out / device / "bundle"), "--server", url, "--token", token,
                         "--server-key", server_key, "--key", key, "--device-id", device, "--json")
            released = run.json("release", manifest["bundle_id"], "--heldout", str(check), "--server", url,
                                "--token", operator, "--bundle", str(v1), "--work", str(out / "release"), "--json",
                                "--tolerance", str(args.tolerance), "--finish", ok=(0, 2))
        timings["release_s"] = time.perf_counter() - t
        result: dict = {"published": released.get("published"), "reasons": released.get("reasons"),
                        "delta_bytes": deltas, "candidate_accuracy": released.get("candidate"),
                        "current_accuracy": released.get("current")}
        if released.get("published"):
            mine = out / "device-a" / "bundle.v2"
            shutil.rmtree(mine, ignore_errors=True)
            token, _ = creds["device-a"]
            pulled = run.json("pull", str(out / "device-a" / "bundle"), "--out", str(mine), "--server", url,
                              "--token", token, "--server-key", server_key, "--json")
            v2 = json.loads((mine / "manifest.json").read_text())
            result.update({k: pulled[k] for k in ("downloaded_bytes", "wire_bytes", "copied", "patched", "derived",
                                                  "total_bytes")})
            result["changed_files"] = sorted(n for n, sha in v2["files"].items() if manifest["files"].get(n) != sha)
            result["server_files"] = {n: v2["sizes"].get(n) for n in v2.get("server_files", {})}
            import numpy as np

            old_w = np.frombuffer((v1 / "weights.safetensors").read_bytes(), "<u4")
            new_w = np.frombuffer((mine / "weights.safetensors").read_bytes(), "<u4")
            result["weights_words_changed"] = int((old_w != new_w).sum()) if old_w.size == new_w.size else None
            merged = out / "release" / f"delta-{released['merge']['sha256'][:16]}.safetensors"
            result["merged_delta_bytes"] = merged.stat().st_size if merged.exists() else None
        result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
