"""Which process am I: rank 0 writes the run directory, the others wait at barriers (env of torchrun/accelerate)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in the global rank-0 process (and in a plain single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (initializes the process group through accelerate when needed)."""
    if world_size() <= 1:
        return
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def zero3_partitioned(model: Any) -> bool:
    """DeepSpeed ZeRO-3 has partitioned this model's parameters (each rank holds a slice)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered_for_save(model: Any, full: bool) -> Iterator[None]:
    """Under ZeRO-3, gather the parameters a save needs (the trainable ones; all for a full model) on every rank."""
    if not zero3_partitioned(model):
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if full or p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
