"""Packed rows without an O(L²) mask: causal SDPA run per packed sequence.

A padding-free packed row (sequences concatenated, `position_ids` restarting at 0) makes transformers' sdpa path
build a dense (L x L) block-diagonal mask; with an explicit mask SDPA on CPU runs its math kernel and keeps the
(heads x L x L) attention probabilities for backward, so memory grows with the square of the row length.
`per_sequence_sdpa` instead splits the row at the restarts and calls `scaled_dot_product_attention(...,
is_causal=True)` on each sequence: no mask exists, the fused (flash) kernels run on CPU and GPU, and memory is
linear in the row length. Rows without restarts (right-padded batches) are one causal call for the whole batch;
with right padding every real token only sees earlier real tokens, so no padding mask is needed either.

It is registered with transformers' `AttentionInterface` and switched on only around training forwards
(`packed_attention`): generation, with left padding and a KV cache, keeps the model's own implementation.
On GPUs with flash-attention installed, models load with `flash_attention_2`, whose varlen kernel already
reads the sequence boundaries from `position_ids`; this path is then not used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NAME = "tunekit_per_sequence_sdpa"
REPLACES = ("sdpa",)  # eager stays eager: it is chosen on purpose (attention outputs, soft-capping)


def _segments(position_ids: torch.Tensor | None, length: int) -> list[list[tuple[int, int]]] | None:
    """[start, end) of each sequence per row, split where positions do not increase by one; None = no restarts."""
    if position_ids is None or length < 2:
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1])[:, -length:]
    breaks = (pos[:, 1:] - pos[:, :-1]) != 1
    if not bool(breaks.any()):
        return None
    rows = []
    for row in breaks.tolist():
        starts = [0] + [i + 1 for i, b in enumerate(row) if b]
        rows.append(list(zip(starts, starts[1:] + [length])))
    return rows


def per_sequence_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax(q kᵀ · scale + causal) v within each packed sequence; returns (batch, L, heads, head_dim)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    groups = getattr(module, "num_key_value_groups", 1)
    extra = {"enable_gqa": True} if groups > 1 else {}
    length = query.shape[2]
    if key.shape[2] != length:  # a KV cache (decoding): not a training forward, use the plain causal path
        raise RuntimeError(f"{NAME} is for training forwards without a KV cache")
    segments = _segments(position_ids, length)
    if segments is None:
        out = sdpa(query, key, value, dropout_p=dropout, scale=scaling, is_causal=length > 1, **extra)
    else:
        out = torch.empty_like(query)
        for b, row in enumerate(segments):
            for s, e in row:
                out[b : b + 1, :, s:e] = sdpa(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                              value[b : b + 1, :, s:e], dropout_p=dropout, scale=scaling,
                                              is_causal=e - s > 1, **extra)
    return out.transpose(1, 2).contiguous(), None


def supported(config) -> bool:
    """Plain causal self-attention: no sliding window, no logit soft-capping (this path implements neither)."""
    if getattr(config, "attn_logit_softcapping", None):
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or getattr(config, "use_sliding_window", True) is False


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, per_sequence_sdpa)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Run the forwards inside with `per_sequence_sdpa` when the model uses sdpa/eager; yields whether it did.

    Masks: transformers builds no mask for an implementation it has no mask function for, which is what this
    attention wants (it reads the sequence boundaries from `position_ids`).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if config is None or current not in REPLACES or not supported(config):
        yield False
        return
    register()
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = current
