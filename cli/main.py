"""`edgecl`: the Typer app. Each command module registers its commands with ``register(app)``.

Command modules import library code inside the command functions, so `edgecl predict` on a
device never imports the host's torch just because `edgecl export` exists.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import warnings
from typing import Annotated, Any

import typer

from edgecl import __version__
from edgecl.errors import EdgeclError

from .options import LogLevel

# click's exceptions, from the click typer runs on (typer >= 0.22 vendors its own copy as typer._click).
_click_exceptions = sys.modules[typer.BadParameter.__module__]
UsageError = _click_exceptions.UsageError
ClickException = _click_exceptions.ClickException
# `edgecl server` with no subcommand: click (>= 8.2) raises this to show the help.
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", None)

# Each name is a module in this package exposing register(app).
COMMAND_MODULES = (
    "export",
    "inspect",
    "apply",
    "delta",
    "adapt",
    "predict",
    "evaluate",
    "watch",
    "review",
    "rollback",
    "upgrade",
    "serve",
    "server",
    "device",
    "push",
    "pull",
    "restat",
    "merge",
    "release",
    "demo",
    "data",
)

app = typer.Typer(
    name="edgecl",
    help="Continual learning on edge devices: export a sparse trainable bundle (host), adapt it "
    "locally (device), and merge deltas from a fleet (server).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rich's boxed tables truncate option names at 80 columns (`--exemplars-pe…`).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgecl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="What is shown on stderr besides errors "
                                                                    "(error: no warnings).")] = LogLevel.warning,
) -> None:
    logging.basicConfig(level=log_level.value.upper(), format="%(levelname)s %(name)s: %(message)s")
    if log_level is LogLevel.error:
        warnings.simplefilter("ignore")


def _one_line_errors(callback):  # noqa: ANN001, ANN202
    """Turn an EdgeclError from a command into one line on stderr and exit code 1."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):  # noqa: ANN202
        try:
            return callback(*args, **kwargs)
        except EdgeclError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _wrap_all(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None and not hasattr(command.callback, "__wrapped__"):
            command.callback = _one_line_errors(command.callback)
        if command.callback is not None and command.short_help is None and command.callback.__doc__:
            # The docstring's first paragraph whole (wrapped), not cut at 45 characters with "...".
            command.short_help = " ".join(command.callback.__doc__.strip().split("\n\n")[0].split())
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _wrap_all(group.typer_instance)


for _name in COMMAND_MODULES:
    importlib.import_module(f"edgecl.cli.{_name}").register(app)
_wrap_all(app)


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001
    return f"warning: {message}\n"


def usage_error_line(exc: Any) -> str:
    """A click usage error as the CLI's one line: ``error: <problem>: <fix>``."""
    problem = exc.format_message().strip().rstrip(".").replace("Value error, ", "")
    command = exc.ctx.command_path if exc.ctx is not None else "edgecl"
    return f"error: {problem}: see `{command} --help`"


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1 (a usage error: exit code 2),
    never a traceback nor click's multi-line usage message."""
    warnings.formatwarning = _format_warning
    try:
        # standalone_mode=False: click raises usage errors to us instead of printing its panel.
        code = app(standalone_mode=False)
    except UsageError as exc:
        if NoArgsIsHelpError is not None and isinstance(exc, NoArgsIsHelpError):
            # `edgecl server` alone: the help, as click would print it.
            typer.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(0)
        typer.echo(usage_error_line(exc), err=True)
        sys.exit(exc.exit_code)  # 2, click's (and the shell's) convention for a usage error
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except EdgeclError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
