"""Write an output (file or folder) to a temporary sibling, then rename it into place.

Nothing the user already had is lost: an existing output needs `overwrite=True`, and even then the old
output is only removed after the new one is complete. The checks and the lock are the output guard's
(tunekit/run/guard.py); missing parent folders are created only at commit, and a failure removes the
temporary output, so nothing of a failed write is left to block the next one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tunekit.run import guard


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early (before any work): exists without `overwrite`, overlaps an input, or not writable."""
    return guard.check(path, inputs, overwrite)


def partial_path(path: str | Path) -> Path:
    """The in-progress sibling of an output: `<name>.partial`."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def staging_path(final: str | Path) -> Path:
    """Where an output is written before commit: a hidden name in the nearest existing folder above it (the
    same file system, so the final rename is atomic; nothing is created above it before commit)."""
    final = guard.absolute(final)
    digest = hashlib.sha256(str(final).encode()).hexdigest()[:10]
    return guard.nearest_existing(final.parent) / f".{final.name}.tunekit-tmp-{digest}"


def remove(path: Path) -> None:
    """Remove a file, a link or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: str | Path, final: str | Path) -> Path:
    """Move a finished `tmp` into `final` (creating its parents now), replacing an existing `final` only after
    `tmp` is complete."""
    tmp, final = Path(tmp), Path(final)
    guard.make_parents(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        remove(old)
    return final


@contextmanager
def atomic_output(
    path: str | Path, overwrite: bool = False, is_dir: bool = True, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a temporary path to write into; on success it becomes `path`, on failure it is removed. The output
    is locked for the duration (a second writer is refused).

    >>> with atomic_output("out", overwrite=False) as tmp:  # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(b"...")
    """
    final = Path(path)
    held = guard.acquire(final, inputs, overwrite)
    try:
        tmp = staging_path(final)
        remove(tmp)  # we hold the lock: a leftover is from a writer that died
        if is_dir:
            tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            remove(tmp)
            raise
        commit(tmp, final)
    finally:
        held.release()
