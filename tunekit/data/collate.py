"""Batch collation: right-padding, or padding-free flattening for packed rows.

Padding-free: every row of the batch is concatenated into one sequence with `position_ids` restarting at 0 for
each original example, so no token attends across examples: in training `tunekit.training.attention` runs
causal SDPA per sequence (memory linear in the row length); flash-attention's varlen kernels read the same
boundaries; plain transformers forwards (sdpa/eager) turn them into a dense block-diagonal mask. The label of
each example's first token is set to -100: in an unpacked batch the model's internal shift never scores it
either, so per-sequence losses are identical to the unpacked ones.

transformers (5.17, `masking_utils._preprocess_mask_arguments`) detects packed rows only when no KV cache exists;
a model with `use_cache=True` (the default, also in training) creates one first and then silently attends across
examples. Padding-free batches therefore carry `use_cache=False`.
"""

from __future__ import annotations

from typing import Any


class SFTCollator:
    """Collate `input_ids`/`labels` (and optional `seq_lengths` from packing) into model inputs."""

    def __init__(self, pad_token_id: int, padding_free: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.real_tokens = 0  # running counts, for the padding share in logs and benchmarks
        self.total_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for f in features:
                lengths = f.get("seq_lengths") or [len(f["input_ids"])]
                ids.extend(f["input_ids"])
                row_labels = list(f["labels"])
                offset = 0
                for n in lengths:
                    positions.extend(range(n))
                    row_labels[offset] = -100
                    offset += n
                labels.extend(row_labels)
            self.real_tokens += len(ids)
            self.total_tokens += len(ids)
            return {
                "input_ids": torch.tensor([ids]),
                "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]),
                "use_cache": False,
            }
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch_ids, batch_labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            batch_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch_labels.append(list(f["labels"]) + [-100] * pad)
            mask.append([1] * n + [0] * pad)
            self.real_tokens += n
        self.total_tokens += longest * len(features)
        return {
            "input_ids": torch.tensor(batch_ids),
            "labels": torch.tensor(batch_labels),
            "attention_mask": torch.tensor(mask),
        }

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.total_tokens if self.total_tokens else 0.0
