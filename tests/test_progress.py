"""edgecl.progress: phases show on a terminal, numbered, and stay out of logs and pipes."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

from edgecl.progress import phase, phases


def test_phases_number_each_step_and_say_when_done() -> None:
    out = io.StringIO()
    with phases(3, "release", stream=out) as ph:
        ph("merging deltas")
        phase("applying them")            # a library function several calls deep reaches the same phases
        ph("checking on held-out images")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["release [1/3] merging deltas...", "release [2/3] applying them...",
                         "release [3/3] checking on held-out images..."]
    assert lines[3].startswith("release: done in ") and lines[3].endswith(" s") and len(lines) == 4


def test_phase_without_active_phases_does_nothing_and_quiet_prints_nothing(capsys) -> None:
    phase("nobody is listening")
    out = io.StringIO()
    with phases(2, "export", enabled=False, stream=out) as ph:     # --quiet
        ph("scoring")
    assert out.getvalue() == ""
    with phases(2, "export") as ph:                                # stderr is not a terminal under pytest
        ph("scoring")
    assert capsys.readouterr().err == ""


def test_a_failed_command_does_not_say_done() -> None:
    out = io.StringIO()
    try:
        with phases(2, "export", stream=out) as ph:
            ph("scoring")
            raise ValueError("boom")
    except ValueError:
        pass
    assert out.getvalue() == "export [1/2] scoring...\n"
    phase("after the failure")                                     # the failed phases are no longer active
    assert out.getvalue() == "export [1/2] scoring...\n"


CHILD = """
from edgecl.progress import phases
with phases(2, "demo") as ph:
    ph("one"); ph("two")
print("stdout stays clean")
"""


def test_on_a_terminal_they_show_on_stderr_and_piped_they_do_not() -> None:
    piped = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert piped.stdout == "stdout stays clean\n" and piped.stderr == ""
    # stderr on a pseudo-terminal, stdout still a pipe
    leader, follower = pty.openpty()
    child = subprocess.run([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=follower, timeout=60)
    os.close(follower)
    shown = os.read(leader, 4096).decode()
    os.close(leader)
    assert child.stdout == b"stdout stays clean\n"
    assert "demo [1/2] one..." in shown and "demo [2/2] two..." in shown and "demo: done in" in shown


def test_an_unknown_total_numbers_without_one_and_no_phase_prints_nothing() -> None:
    out = io.StringIO()
    with phases(0, "adapt", stream=out):
        pass
    assert out.getvalue() == "", "a command whose library announced no phase prints no 'done'"
    with phases(0, "adapt", stream=out):
        phase("embedding the images")
    assert out.getvalue().splitlines()[0] == "adapt [1] embedding the images..."


def test_a_library_call_with_progress_off_does_not_advance_the_callers_phases() -> None:
    out = io.StringIO()
    with phases(2, "release", stream=out) as ph:
        ph("building the candidate")
        phase("writing the bundle", enabled=False)       # apply_deltas(progress=False) inside release
        ph("checking it")
    assert out.getvalue().splitlines()[:2] == ["release [1/2] building the candidate...", "release [2/2] checking it..."]
