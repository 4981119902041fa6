"""`edgecl rollback` after `edgecl upgrade` (what `pull` runs) says what it drops: the state carried over
from the previous version, and the LDA head that went with it (issue 24: it used to drop it silently)."""

from __future__ import annotations

from pathlib import Path

from test_device_adapt import make_image_folder
from typer.testing import CliRunner

from edgecl.cli.main import app

runner = CliRunner()


def test_rollback_of_a_carried_over_state_says_so(bundle_copy: Path, tmp_path: Path) -> None:
    from edgecl.device.adapt import AdaptOptions, adapt

    task = make_image_folder(tmp_path / "task", {"cat": 8, "dog": 8}, seed=4)
    adapt(bundle_copy, task, AdaptOptions(epochs=1, lr=0.05, gate=False, progress=False))
    delta, v2 = tmp_path / "d.safetensors", tmp_path / "v2"
    assert runner.invoke(app, ["delta", str(bundle_copy), "-o", str(delta), "--device-id", "cam1"]).exit_code == 0
    assert runner.invoke(app, ["apply", str(bundle_copy), str(delta), "-o", str(v2), "-q"]).exit_code == 0
    upgraded = runner.invoke(app, ["upgrade", str(bundle_copy), str(v2)])
    assert upgraded.exit_code == 0, upgraded.output

    rolled = runner.invoke(app, ["rollback", str(v2)])
    assert rolled.exit_code == 0, rolled.output
    lines = rolled.output.splitlines()
    assert lines[0].startswith(f"rolled back {v2}: undid gen-000001, the state carried over from {bundle_copy} by "
                               "`edgecl pull` / `upgrade` (stored images of 5 classes"), rolled.output
    assert lines[0].endswith(", LDA statistics)")
    assert "  current state: bundle (the bundle's own, no device state), 5 classes" in lines
    assert "  predict and eval's default head changes from lda to ncm" in lines
    assert "a second rollback is refused" in rolled.output and lines[-1].startswith(f"next: edgecl eval {v2}")
