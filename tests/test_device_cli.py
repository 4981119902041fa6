"""The device commands through the real `edgecl` CLI, in a child process where `import torch` fails.

A device has no torch: adapt, predict, eval and rollback must run without it (the resume path runs
torch-free in test_device_adapt.py). User errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_device_adapt import NO_TORCH, REPO, make_image_folder

_CLI = NO_TORCH + """
from edgecl.cli.main import main
sys.argv = ["edgecl", *sys.argv[1:]]
try:
    main()
finally:
    assert sys.modules["torch"] is None, "something imported torch"
"""


def edgecl(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_device_commands_run_without_torch(bundle_copy, tmp_path):
    data = make_image_folder(tmp_path / "data", {"cat": 10, "class0": 6}, seed=4)
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")

    adapted = edgecl("adapt", bundle_copy, "--data", data, "--epochs", 2, "--checkpoint-every", 2, "-q", "--json")
    assert adapted.returncode == 0, adapted.stderr
    report = json.loads(adapted.stdout)
    assert report["skipped_unreadable"] == 1 and report["classes_added"] == ["cat"]
    assert "unreadable" in adapted.stderr and "Traceback" not in adapted.stderr

    evaluated = edgecl("eval", bundle_copy, "--data", data, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert set(result) >= {"accuracy", "per_class", "most_confused"} and result["state"] == report["state"]

    predicted = edgecl("predict", bundle_copy, data / "cat" / "000.png", "--json", "--top-k", 2)
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)[0]["top_k"]) == 2

    plain = edgecl("predict", bundle_copy, data / "cat" / "000.png")
    assert plain.returncode == 0 and plain.stdout.startswith(str(data / "cat" / "000.png"))

    rolled = edgecl("rollback", bundle_copy)
    assert rolled.returncode == 0 and "bundle" in rolled.stdout


def test_user_errors_are_one_line_and_exit_1(bundle_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    profile = tmp_path / "npu.toml"
    profile.write_text('name = "npu"\nexecution_provider = "QNNExecutionProvider"\n')
    for args in (["adapt", bundle_copy, "--data", tmp_path / "empty"],
                 ["adapt", bundle_copy, "--data", tmp_path / "empty", "--device", profile],
                 ["eval", tmp_path / "nowhere", "--data", tmp_path / "empty"],
                 ["rollback", bundle_copy]):
        done = edgecl(*args)
        assert done.returncode == 1, (args, done.stderr)
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, done.stderr)
    assert not (Path(bundle_copy) / "state").exists()
