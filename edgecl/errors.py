"""One error type for everything a user can get wrong.

Every failure a user can cause (bad file, wrong flag, missing dependency) is raised as an
``EdgeclError`` carrying the problem and the fix; the CLI prints ``str(e)`` on one line and exits 1.
Subclasses name the failure so callers and tests can tell them apart.
"""

from __future__ import annotations


class EdgeclError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}" if fix else problem)


class ConfigError(EdgeclError):
    """A recipe or device profile is missing, malformed or inconsistent."""


class DataError(EdgeclError):
    """An image folder is empty, has the wrong layout, or holds no readable image."""


class BundleError(EdgeclError):
    """A bundle folder is missing files, is from another format version, or fails its hashes."""


class ExportError(EdgeclError):
    """Export could not produce a valid artifact (model, weights, graph)."""


class DeviceError(EdgeclError):
    """The device runtime cannot run as asked (execution provider, memory, state)."""
