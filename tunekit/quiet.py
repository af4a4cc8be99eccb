"""Keep library chatter out of the user's terminal: our own progress bars and one-line messages only.

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


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


_QUIETERS: dict[str, Callable[[], None]] = {"transformers": _quiet_transformers, "datasets": _quiet_datasets}


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
        if fullname not in self.pending or path is not None:
            return None
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
