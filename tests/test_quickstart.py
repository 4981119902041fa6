"""The README quickstart, run as written (bash, the installed `edgecl` command, a real server on
loopback, real Fashion-MNIST folders made by the quickstart itself), with the tiny test model in
place of the real one.

QUICKSTART is read from the README itself (its Quickstart bash block); the test only swaps the recipe
and the port. Each ``#>`` line in the block is what the command before it prints: the test checks
that every one of them is printed, in order, with numbers, hex ids and ``…`` free to differ (the tiny
model scores differently from EfficientNet-Lite0) and the model's name swapped for the test model's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edgecl_test_server import free_port

from edgecl.datasets import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = "test_efficientnet"       # the recipe's name inside the swapped-in file


def _readme_quickstart() -> str:
    """The bash block under the README's "Quickstart" heading: the test runs what users read."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)]


QUICKSTART = _readme_quickstart()

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_TOKEN = re.compile(rf"…|\b(?=[0-9a-f]*\d)[0-9a-f]{{8,}}\b|{_NUMBER}|\s+")


def expected_pattern(line: str) -> re.Pattern[str]:
    """A ``#>`` line as a regex: ``…`` anything, a hex id any hex id, a number any number, spaces any spaces."""
    parts, pos = [], 0
    for m in _TOKEN.finditer(line):
        parts.append(re.escape(line[pos:m.start()]))
        token = m.group()
        if token == "…":
            parts.append(".*")
        elif token.isspace():
            parts.append(r"\s+")
        elif re.fullmatch(r"[0-9a-f]{8,}", token) and not token.isdigit():
            parts.append("[0-9a-f]+")
        else:
            parts.append(_NUMBER)
        pos = m.end()
    parts.append(re.escape(line[pos:]))
    return re.compile("".join(parts))


def expected_lines(block: str) -> list[str]:
    return [line[3:].replace("efficientnet_lite0", TEST_MODEL) for line in block.splitlines()
            if line.startswith("#> ")]


def missing_expected(block: str, printed: str) -> list[str]:
    """The ``#>`` lines not printed in order (each one after the previous one's line)."""
    lines, at, missing = printed.splitlines(), 0, []
    for expected in expected_lines(block):
        pattern = expected_pattern(expected)
        found = next((i for i in range(at, len(lines)) if pattern.fullmatch(lines[i].rstrip())), None)
        if found is None:
            missing.append(expected)
        else:
            at = found + 1
    return missing


def test_expected_output_patterns_free_numbers_and_ids_only() -> None:
    pattern = expected_pattern("added: bundle f9d0d87c4390425b9db9e7b8ea725ca5 v1 (K=167505, 33,352,585 B), 1.914 s")
    assert pattern.fullmatch("added: bundle 0123abcd0123abcd v1 (K=4899, 1,697,054 B), 0.111 s")
    assert not pattern.fullmatch("added: bundle 0123abcd0123abcd v1 (K=4899, 1,697,054 kB), 0.111 s")
    assert expected_pattern("  tshirt: 70.00% of 20").fullmatch("  tshirt: 100.00% of 20")
    assert not expected_pattern("  tshirt: 70.00% of 20").fullmatch("  shirt: 70.00% of 20")
    assert expected_pattern("wrote …/device.toml: device cam1").fullmatch("wrote /tmp/x/device.toml: device cam1")
    assert missing_expected("#> a 1\n#> b 2\n", "a 5\nnoise\nb 7\n") == []
    assert missing_expected("#> b 2\n#> a 1\n", "a 5\nb 7\n") == ["a 1"], "order matters"
    assert len(expected_lines(QUICKSTART)) >= 20, "the README shows what each step prints"


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    if not shutil.which("curl"):
        pytest.skip("the quickstart waits for the server with curl")
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the quickstart makes its folders from Debian's dataset-fashion-mnist (make test installs it)")
    work = tmp_path / "qs"
    (work / "models").mkdir(parents=True)
    shutil.copy(REPO / "models" / "test_efficientnet.toml", work / "models" / "efficientnet_lite0.toml")
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
    # It ends on held-out images (Fashion-MNIST's test file), not on the images the device trained on.
    assert "images in heldout), lda head, state gen-000001 of " in out
    missing = missing_expected(QUICKSTART.replace("8750", port), out)
    assert not missing, "README lines the commands did not print:\n" + "\n".join(missing) + "\n---\n" + out
    # The server was stopped by the quickstart itself.
    assert subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/health"], capture_output=True).returncode != 0
