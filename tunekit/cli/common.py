"""Shared CLI plumbing: the one error boundary every command runs inside.

- TunekitError (bad input): `error: <file>[:<line>]: ...` on stderr, exit code 2 (NumericalError: 3).
- A corrupt or undecodable user file that escaped a `reading()` marker (see tunekit.errors): the same, exit 2.
- Anything else (a bug, not the user's fault): one `error:` line naming a log file that holds the traceback, in
  the run directory when there is one, else in the temp folder; exit code 1. `tunekit --debug` (or
  TUNEKIT_DEBUG=1) prints the traceback on the terminal too.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from tunekit import errors
from tunekit.errors import TunekitError

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("TUNEKIT_DEBUG", "") not in ("", "0", "false")


def write_crash_log(exc: BaseException) -> Path:
    """Write the traceback of `exc` to `<run dir>/crash.log` (if a run directory exists) or the temp folder."""
    text = (f"tunekit crash at {time.strftime('%Y-%m-%d %H:%M:%S')}\nargv: {sys.argv}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    run = errors.log_dir()
    if run is not None and run.is_dir():
        path = run / "crash.log"
        try:
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="tunekit-crash-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(name)


def _say_error(line: str, code: int) -> None:
    """The command's one error line on stderr; a launched worker (`--gpus N`) hands it to the launching process
    instead, which prints it once for all workers."""
    if not errors.hand_to_launcher(line, code):
        typer.echo(line, err=True)


def user_errors(fn: F) -> F:
    """Run a command inside the error boundary (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import click
        import typer._click.exceptions as typer_click_errors

        from tunekit.quiet import quiet_libraries

        quiet_libraries()
        errors.set_log_dir(None)
        try:
            return fn(*args, **kwargs)
        except TunekitError as exc:
            if debug_enabled():
                traceback.print_exc()
            _say_error(f"error: {exc}", exc.exit_code)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None
        except (typer.Exit, typer.Abort, typer_click_errors.ClickException, click.exceptions.Exit,
                click.exceptions.Abort, click.ClickException):
            raise  # typer vendors its own click (typer._click): both kinds are ordinary exits, not crashes
        except Exception as exc:
            if debug_enabled():
                traceback.print_exc()
            message = errors.describe_file_error(exc)
            if message is not None:
                _say_error(f"error: {message}", 2)
                raise typer.Exit(code=2) from None
            log = write_crash_log(exc)
            first = (str(exc).splitlines() or [""])[0][:200]
            _say_error(f"error: internal error ({type(exc).__name__}: {first}); traceback in {log} "
                       "(run with `tunekit --debug ...` to see it here)", 1)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def one_command(name: str, command: Callable[..., Any], help: str | None = None) -> Callable[[typer.Typer], None]:
    """The `register(app)` of a module that adds one command: `tunekit NAME` runs `command` (help: its docstring
    unless given)."""

    def register(app: typer.Typer) -> None:
        app.command(name, help=help)(command)

    return register


def check_range(option: str, value: float | int | None, low: float | None = None, high: float | None = None) -> None:
    """A CLI option's value must lie in [low, high] (None = unbounded); None values are not checked."""
    import math

    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise TunekitError(f"{option}: must be a finite number, got {value}")
    if low is not None and value < low:
        raise TunekitError(f"{option}: must be at least {low}, got {value}")
    if high is not None and value > high:
        raise TunekitError(f"{option}: must be at most {high}, got {value}")
