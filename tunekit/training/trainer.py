"""`transformers.Trainer` with tunekit's memory-lean causal-LM loss and per-sequence attention for packed rows.

loss = Σ_{t: label≠-100} −log p_θ(x_{t+1} | x_≤t) / n, n = labelled tokens of the optimizer step (the Trainer's
`num_items_in_batch`), exactly the loss of transformers' `ForCausalLMLoss`, computed by
`tunekit.training.loss.chunked_cross_entropy` on the decoder's last hidden states: the model runs with no
positions kept for its head (`logits_to_keep` = an empty index), a forward hook takes the decoder output, and
only labelled positions go through the head in chunks. Everything else (optimizer, schedule, accumulation,
checkpoints, callbacks) is the Trainer's own. Stages that need token log-probs call
`tunekit.training.loss.token_logprobs` on `decoder_hidden_states(...)`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import Trainer

from tunekit.errors import TunekitError
from tunekit.launch import ranks
from tunekit.training.attention import packed_attention
from tunekit.training.loss import chunked_cross_entropy, shift_for_next_token

# Config attributes that put something between the head and the softmax: those models keep the plain loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder body, linear head) of a (PEFT-wrapped) causal LM, or None when the chunked loss cannot apply:
    the head is not a plain `nn.Linear` (an adapter on lm_head), the config transforms logits before the softmax,
    or the model's forward has no `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(base, "get_decoder"):
        return None
    cfg = base.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS):
        return None
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    decoder = base.get_decoder()
    if decoder is base:
        return None
    return decoder, head


def decoder_hidden_states(model: torch.nn.Module, decoder: torch.nn.Module, inputs: dict[str, Any]):
    """(last hidden states (batch, L, H), model outputs) from a full forward of `model` that skips its head.

    The forward goes through `model` itself (PEFT, DDP and accelerate wrappers included); the hidden states
    come from a hook on the decoder, the head sees an empty set of positions.
    """
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    ids = inputs.get("input_ids")
    device = ids.device if ids is not None else None
    handle = decoder.register_forward_hook(keep)
    try:
        outputs = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward, saw {len(captured)}")
    return captured[0], outputs


class TunekitTrainer(Trainer):
    """Trainer whose causal-LM loss never holds (tokens x vocab) fp32 logits; `loss_impl='plain'` is stock."""

    def __init__(self, *args: Any, loss_impl: str = "chunked", kernels: str = "none", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl
        self.kernels = kernels
        self._parts = causal_lm_parts(self.model) if loss_impl == "chunked" else None
        self._zero3: bool | None = None  # decided at the first loss: DeepSpeed partitions the model in train()
        if kernels == "liger":
            self._apply_liger()

    def _apply_liger(self) -> None:
        """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on the model; its fused linear CE replaces ours."""
        if not torch.cuda.is_available():
            raise TunekitError("train.kernels: liger needs a CUDA GPU (Liger's kernels are Triton); use `none` here")
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            raise TunekitError("train.kernels: liger needs `pip install liger-kernel`") from None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)

    def _head_loss(self, hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, num_items) -> torch.Tensor:
        h, y = shift_for_next_token(hidden, labels)
        if self.kernels == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            keep = y.reshape(-1) != -100
            flat = h.reshape(-1, h.shape[-1])[keep]
            total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, flat, y.reshape(-1)[keep], head.bias)
            return total / (num_items if num_items is not None else max(int(keep.sum()), 1))
        return chunked_cross_entropy(h, head.weight, y, bias=head.bias, num_items=num_items)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._zero3 is None:  # ZeRO-3 gathers lm_head only inside its own forward: the chunked loss steps aside
            self._zero3 = ranks.zero3_partitioned(model)
        with packed_attention(model):
            if (self._parts is None or "labels" not in inputs or self.label_smoother or self.compute_loss_func
                    or self._zero3):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            decoder, head = self._parts
            labels = inputs["labels"]
            hidden, outputs = decoder_hidden_states(model, decoder, {k: v for k, v in inputs.items() if k != "labels"})
            loss = self._head_loss(hidden, head, labels, num_items_in_batch)
        # As Trainer.compute_loss: with tokens averaged across devices, the per-device loss is scaled back up.
        averaged = self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
        if averaged and num_items_in_batch is not None:
            scale = self.accelerator.num_processes
            pc = getattr(self.accelerator, "parallelism_config", None)
            if pc is not None:
                scale //= pc.tp_size
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward under the packed attention: gradient checkpointing recomputes each layer's forward
        inside the backward, and the recomputation must run the same attention (and save the same tensors)."""
        with packed_attention(model):
            return super().training_step(model, inputs, num_items_in_batch)
