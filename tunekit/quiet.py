"""Keep library chatter out of the user's terminal: our own progress bars and one-line messages only.

Libraries' log records (DeepSpeed's `Setting accelerator to CPU` warning, transformers' and datasets' warnings)
go to one handler, `LIBRARY_LOG`, that holds them until a run directory exists and then appends them to
`<run>/library.log` (`library_log_to`); errors of DeepSpeed still reach the terminal.

transformers and datasets are quieted when they are imported, not imported here: a command that never uses them
(`tunekit merge` needs only torch and safetensors) does not pay their import time and ~100 MB of RSS.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any


class LibraryLog(logging.Handler):
    """Library log records: kept in memory (the latest 2,000) until `to(path)` names a file, then appended there."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[str] = []
        self.file: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a library's malformed record must never break the run
            line = f"{record.levelname} {record.name}: {record.msg!r}"
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.pending = [*self.pending[-1999:], line]

    def to(self, path: str | os.PathLike | None) -> None:
        """Append from now on to `path` (what was held first); None closes the file and holds again."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if path is not None:
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across the run's rename
            self.file.writelines(line + "\n" for line in self.pending)
            self.file.flush()
            self.pending = []


LIBRARY_LOG = LibraryLog()


def library_log_to(path: str | os.PathLike | None) -> None:
    """Write the libraries' log records to `path` (a run's library.log) from now on; None stops."""
    LIBRARY_LOG.to(path)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(LIBRARY_LOG)
    hf_logging.disable_progress_bar()


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _quiet_deepspeed() -> None:
    """DeepSpeed's logger prints to stdout from its own handler (even during `import deepspeed`): records go to
    the library log instead; its errors still reach the terminal."""
    ds_logger = logging.getLogger("DeepSpeed")
    for handler in list(ds_logger.handlers):
        ds_logger.removeHandler(handler)
    ds_logger.addHandler(LIBRARY_LOG)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    errors.setFormatter(logging.Formatter("DeepSpeed %(levelname)s: %(message)s"))
    ds_logger.addHandler(errors)


_QUIETERS: dict[str, Callable[[], None]] = {
    "transformers": _quiet_transformers,
    "datasets": _quiet_datasets,
    "deepspeed.utils.logging": _quiet_deepspeed,
}


def _run(name: str) -> None:
    try:
        _QUIETERS[name]()
    except ImportError:
        pass


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Runs a library's quieter right after the library's first import (a post-import hook).

    It finds the library's spec through the other finders and wraps that loader's `exec_module` (the loader itself
    is kept, so `__spec__.loader` and resource reading are unchanged).
    """

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending  # the libraries not imported yet

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname not in self.pending or (path is not None) != ("." in fullname):
            return None  # a top-level library is found with path None, a submodule with its package's path
        self.pending.discard(fullname)  # once, and no recursion from the lookup below
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_quiet(module) -> None:  # noqa: ANN001
            exec_module(module)
            _run(fullname)

        try:
            loader.exec_module = exec_and_quiet  # type: ignore[union-attr]
        except AttributeError:  # pragma: no cover - a loader with __slots__: imported unquieted
            pass
        return spec


_HOOK: list[_QuietOnImport] = []


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes logs a warning about an optional kernels package on every import on CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    for name in _QUIETERS:
        if name in sys.modules:
            _run(name)
    if not _HOOK:
        _HOOK.append(_QuietOnImport({n for n in _QUIETERS if n not in sys.modules}))
        sys.meta_path.insert(0, _HOOK[0])
