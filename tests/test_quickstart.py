"""The README quickstart, run as written (bash, the installed `edgecl` command, a real server on
loopback), with the tiny test model and generated images in place of the real ones.

QUICKSTART is what the README shows, line for line; the test only swaps the recipe and the port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder
from edgecl_test_server import free_port

REPO = Path(__file__).resolve().parents[1]

QUICKSTART = """\
# 1. host: export a bundle (model recipe + a folder of calibration images, one sub-folder per class)
edgecl export models/efficientnet_lite0.toml --data calib -o bundle

# 2. server: register a device and an admin, store the bundle, start the server
export EDGECL_SERVER_STORE=$PWD/store
edgecl server device add cam1 | tee cam1.txt
edgecl server device add ops --admin | tee ops.txt
edgecl server bundle add bundle
edgecl server key > server.key
edgecl server start --port 8750 > server.log 2>&1 &
until curl -sf http://127.0.0.1:8750/health > /dev/null; do sleep 0.2; done

# 3. device: provision once (the token and key printed above, the server's key), then adapt, delta, push
cp -r bundle device-bundle
export EDGECL_DEVICE_CONFIG=$PWD/device.toml
edgecl device init --server http://127.0.0.1:8750 --name cam1 \\
    --token "$(awk '/^token/ {print $2}' cam1.txt)" --key "$(awk '/^key/ {print $2}' cam1.txt)" \\
    --server-key "$(cat server.key)" --bundle device-bundle
edgecl adapt device-bundle --data new_images
edgecl delta device-bundle -o delta.safetensors
edgecl push delta.safetensors

# 4. ops: merge the fleet's deltas, check the result on held-out images, publish v2 only if not worse
edgecl release bundle --heldout heldout --server http://127.0.0.1:8750 \\
    --token "$(awk '/^token/ {print $2}' ops.txt)"

# 5. device: fetch v2 (signature and every file checked), carry the device's memory over, use it
edgecl pull
edgecl eval device-bundle.v2 --data new_images
"""


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    if not shutil.which("curl"):
        pytest.skip("the quickstart waits for the server with curl")
    work = tmp_path / "qs"
    (work / "models").mkdir(parents=True)
    shutil.copy(REPO / "models" / "test_efficientnet.toml", work / "models" / "efficientnet_lite0.toml")
    write_image_folder(work / "calib", classes=3, per_class=12, seed=1)
    new_classes = ["_0", "_1", "_2", "bolt", "nut"]        # drawn unlike the calibration classes (conftest)
    write_image_folder(work / "new_images", names=new_classes, per_class=12, seed=2)
    write_image_folder(work / "heldout", names=["class0", "class1", "class2", "bolt", "nut"], per_class=6, seed=3)
    for name in ("_0", "_1", "_2"):
        shutil.rmtree(work / "new_images" / name)
    port = str(free_port())
    script = ("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
              + QUICKSTART.replace("8750", port))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("EDGECL_SERVER_STORE", None)
    env.pop("EDGECL_DEVICE_CONFIG", None)
    result = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = (work / "server.log").read_text() if (work / "server.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\nserver: {log[-1500:]}"
    out = result.stdout
    assert "released " in out and " v2 (signed by the server)" in out
    assert "upgraded " in out and "v1 -> v2" in out
    assert (work / "device-bundle.v2" / "state" / "HEAD.json").exists()
    assert "accuracy" in out.lower()
