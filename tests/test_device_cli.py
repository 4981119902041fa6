"""The device commands through the real `edgecl` CLI, in a child process that cannot import the host's stack.

A device has no torch: adapt, predict, eval, delta and rollback must run without it. The child installs
an import hook that refuses torch, timm and onnx (and their submodules) and records every attempt, even
one a `try: import torch` would swallow; the test asserts no attempt was made and checks each command's
real output. User errors are one line on stderr and exit code 1. (tests/test_device_venv.py does the
same in a virtualenv where those packages are not installed at all.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_device_adapt import REPO, make_image_folder

BLOCKED = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnx_ir")

_CLI = f"""
import sys
ATTEMPTS, BLOCKED = sys.argv[1], {BLOCKED!r}

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(ATTEMPTS, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{{name}} is blocked: a device has no host stack")
        return None

sys.meta_path.insert(0, _Refuse())
from edgecl.cli.main import main
sys.argv = ["edgecl", *sys.argv[2:]]
main()
"""


def edgecl(attempts: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI, str(attempts), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_device_commands_run_without_the_host_stack(bundle_copy, tmp_path):
    attempts = tmp_path / "attempts.txt"
    data = make_image_folder(tmp_path / "data", {"cat": 10, "class0": 6}, seed=4)
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")

    adapted = edgecl(attempts, "adapt", bundle_copy, "--data", data, "--epochs", 2, "--checkpoint-every", 2, "-q",
                     "--json")
    assert adapted.returncode == 0, adapted.stderr
    report = json.loads(adapted.stdout)
    assert report["state"] == "gen-000001" and report["images"] == 16 and report["skipped_unreadable"] == 1
    assert report["classes_added"] == ["cat"] and report["epochs"] == 2
    assert "unreadable" in adapted.stderr and "Traceback" not in adapted.stderr

    images = sorted((data / "cat").glob("*.png")) + sorted((data / "class0").glob("*.png"))
    predicted = edgecl(attempts, "predict", bundle_copy, *images, "--json", "--top-k", 2, "--head", "ncm")
    assert predicted.returncode == 0, predicted.stderr
    results = json.loads(predicted.stdout)
    assert [r["path"] for r in results] == [str(p) for p in images]
    for r in results:
        assert len(r["top_k"]) == 2 and r["state"] == "gen-000001" and r["head"] == "ncm"
        assert r["class"] == r["top_k"][0]["class"]
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
    right = sum(r["class"] == Path(r["path"]).parent.name for r in results)

    evaluated = edgecl(attempts, "eval", bundle_copy, "--data", data, "--json", "--head", "ncm")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["correct"] == right, "eval and predict score the same images with the same head alike"
    assert result["images"] == 16 and result["skipped_unreadable"] == 1 and result["state"] == "gen-000001"
    assert result["accuracy"] == result["correct"] / 16
    assert {name: row["images"] for name, row in result["per_class"].items()} == {"cat": 10, "class0": 6}
    assert sum(row["correct"] for row in result["per_class"].values()) == result["correct"]

    plain = edgecl(attempts, "predict", bundle_copy, images[0])
    assert plain.returncode == 0 and plain.stdout.startswith(f"{images[0]}: ")
    assert plain.stdout.rstrip().endswith("[head lda, state gen-000001]"), "auto uses the LDA head adapt made"

    delta = edgecl(attempts, "delta", bundle_copy, "-o", tmp_path / "d.safetensors")
    assert delta.returncode == 0, delta.stderr
    assert (tmp_path / "d.safetensors").stat().st_size > 0

    rolled = edgecl(attempts, "rollback", bundle_copy)
    assert rolled.returncode == 0 and rolled.stdout.strip() == "rolled back gen-000001; current state: bundle"
    assert not attempts.exists(), f"a device command tried to import: {attempts.read_text()}"


def test_the_hook_does_block(tmp_path):
    """The same child, asked for a host command: the hook refuses torch (so the test above can fail)."""
    attempts = tmp_path / "attempts.txt"
    done = edgecl(attempts, "export", REPO / "models" / "test_vit.toml", "--data", tmp_path, "-o", tmp_path / "b")
    assert done.returncode != 0
    assert attempts.read_text().splitlines()[0].split(".")[0] in BLOCKED


def test_user_errors_are_one_line_and_exit_1(bundle_copy, tmp_path):
    attempts = tmp_path / "attempts.txt"
    (tmp_path / "empty").mkdir()
    profile = tmp_path / "npu.toml"
    profile.write_text('name = "npu"\nexecution_provider = "QNNExecutionProvider"\n')
    expected = {
        "adapt-empty": f"{tmp_path / 'empty'} has no class sub-folders",
        "adapt-provider": "execution provider QNNExecutionProvider is not available",
        "eval-nowhere": f"{tmp_path / 'nowhere'} is not a bundle folder",
        "rollback": "has no earlier state to roll back to",
    }
    for key, args in (("adapt-empty", ["adapt", bundle_copy, "--data", tmp_path / "empty"]),
                      ("adapt-provider", ["adapt", bundle_copy, "--data", tmp_path / "empty", "--device", profile]),
                      ("eval-nowhere", ["eval", tmp_path / "nowhere", "--data", tmp_path / "empty"]),
                      ("rollback", ["rollback", bundle_copy])):
        done = edgecl(attempts, *args)
        assert done.returncode == 1, (args, done.stderr)
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected[key] in lines[0], (args, done.stderr)
    assert not (Path(bundle_copy) / "state").exists()
    assert not attempts.exists()
