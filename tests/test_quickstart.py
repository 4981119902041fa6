"""The README quickstart, run as written (bash, the installed `edgecl` command, a real server on
loopback), with the tiny test model and generated images in place of the real ones.

QUICKSTART is read from the README itself (its Quickstart bash block); the test only swaps the recipe
and the port.
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

def _readme_quickstart() -> str:
    """The bash block under the README's "Quickstart" heading: the test runs what users read."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)]


QUICKSTART = _readme_quickstart()


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
