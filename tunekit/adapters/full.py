"""Full fine-tuning: every parameter trains. W' = W − η∇W."""

from __future__ import annotations

from typing import Any

from tunekit.adapters import AttachContext, register
from tunekit.config.schema import AdapterConfig


@register("none", "full fine-tuning (all parameters)")
def build_full(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
