"""The errors users see: a single line on stderr and a non-zero exit code, never a traceback.

`reading(path)` marks where a user file is read: a decoding error, a truncated or corrupt file (JSON,
safetensors, parquet, YAML), or a bad Jinja template raised inside it becomes `error: <path>[:<line>]: ...`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TunekitError(Exception):
    """Bad input from the user (recipe, data, paths). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


_LOG_DIR: list[Path | None] = [None]


def set_log_dir(path: str | Path | None) -> None:
    """Where a crash log goes for the command now running (its run directory); None = the temp folder."""
    _LOG_DIR[0] = Path(path) if path is not None else None


def log_dir() -> Path | None:
    return _LOG_DIR[0]


class NumericalError(TunekitError):
    """Training or merging produced non-finite numbers (nan/inf). Exit code 3: the input was valid, the numbers
    were not."""

    exit_code = 3


#: Set by the launcher (`--gpus N`) for its workers: the file a worker records its error line in.
WORKER_ERROR_ENV = "TUNEKIT_WORKER_ERROR_FILE"


def hand_to_launcher(line: str, code: int) -> bool:
    """In a launched worker: record this command's `error:` line and exit code for the launching process, which
    prints it once for all workers. True when recorded (the worker then prints nothing); the first worker's error
    is the one kept. False outside a launch, or when the file cannot be written (the worker prints it itself)."""
    path = os.environ.get(WORKER_ERROR_ENV)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return True  # another worker's error is already recorded
    except OSError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"line": line, "code": code}, fh)
    return True


def worker_error(path: str | Path) -> tuple[str, int] | None:
    """(error line, exit code) a launched worker recorded in `path` (`hand_to_launcher`), or None."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
        return str(found["line"]), int(found["code"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def describe_file_error(exc: BaseException, path: str | Path | None = None) -> str | None:
    """`<path>[:<line>]: <what>` for an error that means a user file is unreadable or corrupt; None otherwise."""
    if path is None:
        path = getattr(exc, "filename", None) or getattr(exc, "tunekit_file", None)
    name = str(path) if path is not None else None
    if isinstance(exc, UnicodeDecodeError):
        return f"{name or 'input'}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        if name and Path(name).is_dir():
            return f"{name}: a JSON file in it is invalid: {exc.msg} (line {exc.lineno})"
        return f"{name or 'input'}:{exc.lineno}: invalid JSON: {exc.msg}"
    try:
        import jinja2

        if isinstance(exc, jinja2.TemplateSyntaxError):
            line = f":{exc.lineno}" if exc.lineno else ""
            return f"{name or exc.filename or 'chat template'}{line}: invalid Jinja template: {exc.message}"
        if isinstance(exc, jinja2.TemplateError):
            return f"{name or 'chat template'}: chat template failed: {exc}"
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):
            return f"{name or 'weights'}: corrupt or truncated safetensors file ({exc})"
    except ImportError:  # pragma: no cover
        pass
    try:
        import pyarrow

        if isinstance(exc, (pyarrow.ArrowInvalid, pyarrow.ArrowException)):
            return f"{name or 'data'}: corrupt or unreadable file ({str(exc).splitlines()[0]})"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and name:
        return f"{name}: {exc.strerror or exc}"
    text = str(exc)
    if isinstance(exc, (OSError, ValueError, RuntimeError, EnvironmentError)) and any(
        s in text for s in ("Error while deserializing header", "HeaderTooLarge", "incomplete metadata",
                            "MetadataIncompleteBuffer", "Unable to load weights", "invalid load key")
    ):
        return f"{name or 'weights'}: corrupt or truncated model file ({text.splitlines()[0][:200]})"
    return None


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn a decode/corrupt-file error raised while reading `path` into a TunekitError naming `path`."""
    try:
        yield
    except TunekitError:
        raise
    except Exception as exc:
        message = describe_file_error(exc, path)
        if message is None:
            raise
        raise TunekitError(message) from exc
