"""Write an output (file or folder) to a temporary sibling, then rename it into place.

Nothing the user already had is lost: an existing output needs `overwrite=True`, and even then the old
output is only removed after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunekit.errors import TunekitError


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists and `overwrite` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TunekitError(f"output '{path}' already exists; pass --overwrite to replace it")
    return path


def partial_path(path: str | Path) -> Path:
    """The in-progress sibling of an output: `<name>.partial`."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def commit(tmp: str | Path, final: str | Path) -> Path:
    """Move a finished `tmp` into `final`, replacing an existing `final` only after `tmp` is complete."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return final


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write into; on success it becomes `path`, on failure it is removed.

    >>> with atomic_output("out", overwrite=False) as tmp:  # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(b"...")
    """
    final = check_output(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    commit(tmp, final)
