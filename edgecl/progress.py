"""Progress for the long steps (decode, export, adapt, eval, release): one rule for when it shows.

Two shapes, one rule:
- a bar (:func:`progress_bar`) over counted items: images, steps (tqdm shows the rate and an ETA);
- phases (:func:`phases`) for steps that cannot be counted, e.g. "building the step graph": each
  phase prints one line ``export [3/6] choosing the mask...`` when it starts, and the whole prints
  ``export: done in 41 s`` at the end.

Both go to stderr, only when stderr is a terminal: piped or logged output (CI, `--json | jq`,
a systemd unit) stays free of progress noise, and stdout is never touched, so `--json` output
remains parseable. ``enabled=False`` (``--quiet``) turns them off on a terminal too.

Library code several calls deep announces its phase with :func:`phase` without being handed the
object: it advances the innermost active :func:`phases`, and does nothing when there is none (the
same function called by a command that shows no phases).
"""

from __future__ import annotations

import contextvars
import sys
import time
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]


def progress_enabled(enabled: bool = True) -> bool:
    """Whether progress would show: asked for, and stderr is a terminal."""
    try:
        return enabled and sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar over ``total`` items (``bar.update(n)``; use as a context manager to close it)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_enabled(enabled))


_ACTIVE: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("edgecl_phases", default=None)


class Phases:
    """Numbered phases of one long command; ``ph("merging deltas")`` starts the next one.

    Use through :func:`phases` as a context manager. Calls beyond ``total`` still print (numbered
    past the total) rather than fail: a miscounted phase must never break the command it reports on.
    With no phase announced, nothing is printed at all (not even "done").
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.total = int(total)
        self.desc = desc
        self.shown = progress_enabled(enabled) if stream is None else enabled
        self.stream = stream
        self.index = 0
        self.started = time.monotonic()
        self._token: contextvars.Token[Phases | None] | None = None

    def _write(self, line: str) -> None:
        if self.shown:
            out = self.stream or sys.stderr
            out.write(line + "\n")
            out.flush()

    def __call__(self, what: str) -> None:
        """Start the next phase: prints ``DESC [i/total] WHAT...``."""
        self.index += 1
        count = f"{self.index}/{self.total}" if self.total > 0 else str(self.index)   # total 0: not known
        self._write(f"{self.desc} [{count}] {what}...")

    def __enter__(self) -> Phases:
        self.started = time.monotonic()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None
        if exc_type is None and self.index:
            self._write(f"{self.desc}: done in {time.monotonic() - self.started:.0f} s")


def phases(total: int, desc: str, enabled: bool = True, stream: IO[str] | None = None) -> Phases:
    """``with phases(5, "release") as ph: ph("merging deltas"); ...`` (shown only on a terminal).

    ``stream`` (tests) forces the output to that stream whatever the terminal; ``enabled`` still applies.
    """
    return Phases(total, desc, enabled, stream)


def phase(what: str, enabled: bool = True) -> None:
    """Start the next phase of the innermost active :func:`phases`; nothing when none is active.

    ``enabled=False`` (a caller that passed ``progress=False``) announces nothing: e.g. `edgecl release`
    builds bundles inside its own phases, and the bundle writer's phases must not count as release's.
    """
    active = _ACTIVE.get()
    if enabled and active is not None:
        active(what)
