"""Full fine-tuning: every parameter trains. W' = W − η∇W.

The result is a whole model (RUN/model/), not an adapter: it loads directly (chaining, eval, merge inputs), so
this kind has no adapter loader, fold, merge plan or LoRA export. Reward models (task seq_cls) train in full too.
"""

from __future__ import annotations

from typing import Any

from tunekit.adapters import AdapterKind, AttachContext, register
from tunekit.config.schema import AdapterConfig


def build_full(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


KIND = register(
    AdapterKind(
        "full",
        build_full,
        "full fine-tuning (all parameters)",
        methods=("none",),
        sum_refusal="a full fine-tune is a whole model: merge models with task_arithmetic instead",
        export_refusal="a full fine-tune is a whole model, not an adapter",
    )
)
