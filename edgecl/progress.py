"""Progress bars for the long steps (decode, export, adapt, eval): one rule for when they show.

A bar goes to stderr, only when stderr is a terminal: piped or logged output (CI, `--json | jq`,
a systemd unit) stays free of carriage-return noise, and stdout is never touched, so `--json`
output remains parseable. ``enabled=False`` (``--quiet``) turns it off on a terminal too.
"""

from __future__ import annotations

import sys

from tqdm import tqdm  # type: ignore[import-untyped]


def progress_enabled(enabled: bool = True) -> bool:
    """Whether a bar would show: asked for, and stderr is a terminal."""
    try:
        return enabled and sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar over ``total`` items (``bar.update(n)``; use as a context manager to close it)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_enabled(enabled))
