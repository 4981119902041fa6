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
    assert rolled.returncode == 0, rolled.stderr
    said = rolled.stdout.splitlines()
    assert said[0].startswith(f"rolled back {bundle_copy}: undid gen-000001, the adaptation on {data} (added cat"), \
        rolled.stdout
    assert "  current state: bundle (the bundle's own, no device state), 3 classes" in said
    assert "  classes no longer known: cat" in said
    assert "  predict and eval's default head changes from lda to ncm" in said, "auto was lda (adapt made it)"
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


# -- the first hour's traps: config defaults, folders, usage errors, a wrong token, what rollback undoes ----------

def test_the_device_config_supplies_the_bundle_and_predict_takes_folders(bundle_copy, tmp_path):
    """After `device init --bundle DIR`, adapt / eval / predict / delta / rollback need no BUNDLE; predict
    scores every image of a folder (it used to say "none of the given images could be decoded")."""
    attempts = tmp_path / "attempts.txt"
    data = make_image_folder(tmp_path / "data", {"cat": 6, "class0": 4}, seed=5)
    config = tmp_path / "device.toml"
    from edgecl_test_server import free_port

    # Nothing listens on that port: init says the token was not checked and still writes the config.
    init = edgecl(attempts, "device", "init", "--server", f"http://127.0.0.1:{free_port()}", "--name", "cam1",
                  "--token", "ecl_x", "--key", "ab" * 32, "--bundle", bundle_copy, "--config", config)
    assert init.returncode == 0 and "token unreachable: " in init.stdout, init.stdout + init.stderr
    assert "next: edgecl adapt --data DIR" in init.stdout

    adapted = edgecl(attempts, "adapt", "--data", data, "--epochs", 1, "-q", "--config", config)
    assert adapted.returncode == 0, adapted.stderr
    assert adapted.stdout.startswith(f"adapted {bundle_copy} on 10 images of 2 classes from {data}")
    assert "next: edgecl delta -o delta.safetensors" in adapted.stdout, "the configured bundle is not repeated"

    folder = edgecl(attempts, "predict", data / "cat", "--json", "--config", config)
    assert folder.returncode == 0, folder.stderr
    paths = [r["path"] for r in json.loads(folder.stdout)]
    assert paths == [str(p) for p in sorted((data / "cat").glob("*.png"))]
    both = edgecl(attempts, "predict", bundle_copy, data, "--json")      # a bundle first, then a folder of folders
    assert both.returncode == 0 and len(json.loads(both.stdout)) == 10, both.stderr

    evaluated = edgecl(attempts, "eval", "--data", data, "--config", config)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"images in {data}), lda head, state gen-000001 of {bundle_copy}" in evaluated.stdout.splitlines()[0]

    delta = edgecl(attempts, "delta", "-o", tmp_path / "d.safetensors", "--config", config)
    assert delta.returncode == 0 and (tmp_path / "d.safetensors").is_file(), delta.stderr
    assert "next: edgecl push " in delta.stdout

    rolled = edgecl(attempts, "rollback", "--config", config)
    assert rolled.returncode == 0 and rolled.stdout.startswith(f"rolled back {bundle_copy}: undid gen-000001")
    assert not attempts.exists()


def test_usage_errors_are_one_line(tmp_path):
    attempts = tmp_path / "attempts.txt"
    # --data is optional since --from-review names the images instead: its absence is adapt's own one line
    missing = edgecl(attempts, "adapt", tmp_path)
    assert missing.returncode == 1 and missing.stderr == \
        "error: no images to adapt on: pass --data DIR, or --from-review for the labeled review images\n", missing.stderr
    missing = edgecl(attempts, "eval", tmp_path)
    assert missing.returncode == 2 and missing.stderr == \
        "error: Missing option '--data': see `edgecl eval --help`\n", missing.stderr
    unknown = edgecl(attempts, "eval", tmp_path, "--data", tmp_path, "--exemplars")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("error: No such option: --exemplars")
    # No BUNDLE and no config naming one: one line that says both ways out.
    # Without a configured bundle, predict's first path is the bundle, and a wrong one is said as such.
    wrong = edgecl(attempts, "predict", tmp_path / "nowhere", tmp_path / "a.png")
    assert wrong.returncode == 1 and wrong.stderr.startswith(f"error: {tmp_path / 'nowhere'} is not a bundle folder")
    nobundle = edgecl(attempts, "eval", "--data", tmp_path, "--config", tmp_path / "none.toml")
    assert nobundle.returncode == 1 and nobundle.stderr.count("\n") == 1, nobundle.stderr
    assert nobundle.stderr.startswith("error: no bundle given and no device config names one: pass the bundle "
                                      "folder, or run `edgecl device init ... --bundle DIR`")


def test_device_init_refuses_a_wrong_token_or_server_key_when_the_server_answers(tmp_path):
    from edgecl_test_server import ServerProcess, make_fleet

    attempts = tmp_path / "attempts.txt"
    fleet = make_fleet(tmp_path / "store", 1)
    server = ServerProcess(tmp_path / "store").start()
    try:
        token, key = fleet.devices["dev-0"]
        config = tmp_path / "device.toml"
        args = ["device", "init", "--server", server.url, "--name", "dev-0", "--key", key.hex(), "--config", config]
        wrong = edgecl(attempts, *args, "--token", "ecl_wrong")
        assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1, wrong.stderr
        assert wrong.stderr.startswith(f"error: the server {server.url} refuses this token (auth_invalid): pass the "
                                       "token `edgecl server device add dev-0` printed"), wrong.stderr
        assert not config.exists(), "a refused token writes nothing"
        other_key = "11" * 32
        bad_key = edgecl(attempts, *args, "--token", token, "--server-key", other_key)
        assert bad_key.returncode == 1 and "--server-key is not the key" in bad_key.stderr, bad_key.stderr
        assert not config.exists()
        good = edgecl(attempts, *args, "--token", token, "--server-key", fleet.store.release_public_key())
        assert good.returncode == 0, good.stderr
        assert "(token accepted by the server, server key matches)" in good.stdout and config.exists()
    finally:
        server.stop()
        fleet.store.close()
