"""Help that fits 80 columns: no option name cut short (`--exemplars-pe…`), no `--version <bool>`,
and the command list shows each command's first paragraph whole."""

from __future__ import annotations

import os
import subprocess
import sys

import typer.main

from edgecl.cli.main import app


def _all_command_paths() -> list[list[str]]:
    paths: list[list[str]] = []

    def walk(command, prefix: list[str]) -> None:  # noqa: ANN001
        paths.append(prefix)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_every_help_fits_80_columns_with_whole_option_names() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    paths = _all_command_paths()
    assert ["adapt"] in paths and ["server", "device", "add"] in paths and ["data", "fashion-mnist"] in paths
    code = ("import sys; from edgecl.cli.main import main\n"
            "for path in sys.argv[1:]:\n"
            "    sys.argv = ['edgecl', *path.split(), '--help']\n"
            "    print('=== ' + path)\n"
            "    try:\n        main()\n    except SystemExit:\n        pass\n")
    done = subprocess.run([sys.executable, "-c", code, *(" ".join(p) for p in paths if p)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for section in text.split("=== ")[1:]:
        name = section.splitlines()[0]
        for line in section.splitlines()[1:]:
            assert len(line) <= 80, (name, line)
            assert "…" not in line, (name, line)
    assert "--exemplars-per-class <int>" in text
    top = subprocess.run([sys.executable, "-c", "from edgecl.cli.main import main; main()", "--help"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    assert "--version " in top and "<bool>" not in top
    assert "Score weights by MI-Fisher information, keep the top few percent,\n" in top, "whole, wrapped"
