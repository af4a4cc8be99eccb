"""The three networks PPO needs, built around one policy: the value head (shared backbone or a separate
model), the frozen reference, and one forward pass that returns response log-probs, entropy and values.

Memory: with an adapter policy the reference is the same model with the adapter switched off, and the shared
value head reads the policy's last hidden state, so the base weights are held once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunekit.ppo.algorithm import entropy_of, logprobs_of

# Methods whose adapter-off model is not the starting policy (PiSSA/MiLoRA move singular triplets out of W):
# their reference is a frozen copy of the base instead.
REFERENCE_NEEDS_COPY = ("pissa", "milora")


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the final (normed) hidden state h_t; zero-initialised, so V starts at 0 and the
    first value-loss gradients do not disturb the backbone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def hidden_size_of(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every Dropout: PPO's ratio π_θ/π_old must compare the same function, not two dropout masks."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding does not shift them), as `generate` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # (B, T) log π(y_t | x, y_<t) at the sampling temperature
    entropy: torch.Tensor | None  # (B, T)
    values: torch.Tensor | None  # (B, T) V(x, y_<t)


class PolicyValue(nn.Module):
    """Policy (causal LM, full or with an adapter) + value function. `value_model` None = the head reads the
    policy's backbone (shared); else a separate backbone (AutoModel) under the head."""

    def __init__(self, policy: nn.Module, value_head: ValueHead, value_model: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_model = value_model

    @property
    def shared(self) -> bool:
        return self.value_model is None

    def forward(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float = 1.0,
        with_values: bool = True, with_entropy: bool = False,
    ) -> ForwardOut:
        """One pass over prompt + response; outputs cover the T response positions only (logits at position
        P−1+t predict response token t, so the prompt is never scored)."""
        T = sequences.shape[1] - prompt_len
        positions = position_ids_of(attention_mask)
        want_hidden = with_values and self.shared
        out = self.policy(
            input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False,
            output_hidden_states=want_hidden, logits_to_keep=T + 1,
        )
        logits = out.logits[:, :-1] / (temperature if temperature > 0 else 1.0)
        response = sequences[:, prompt_len:]
        logprobs = logprobs_of(logits, response)
        entropy = entropy_of(logits) if with_entropy else None
        values = None
        if with_values:
            if self.shared:
                hidden = out.hidden_states[-1][:, prompt_len - 1 : -1]
            else:
                hidden = self.value_model(
                    input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False
                ).last_hidden_state[:, prompt_len - 1 : -1]
            values = self.value_head(hidden)
        return ForwardOut(logprobs, entropy, values)


class Reference:
    """π_ref: the adapter switched off (`disable_adapter()` for PEFT, the base layer's own forward for
    tunekit's LoRA-XS / SVFT modules), or a frozen copy of the starting policy when that is not the base."""

    def __init__(self, policy: nn.Module, method: str, frozen_copy: nn.Module | None = None):
        self.policy = policy
        self.method = method
        self.copy = frozen_copy
        if self.copy is not None:
            self.copy.requires_grad_(False)
            self.copy.eval()

    @property
    def kind(self) -> str:
        return "frozen copy" if self.copy is not None else "adapter off"

    @classmethod
    def for_policy(cls, policy: nn.Module, method: str, load_base: Any = None) -> Reference:
        """`load_base()` builds a fresh base model; called only when a copy is needed."""
        if method == "none":
            return cls(policy, method, copy.deepcopy(policy))
        if method in REFERENCE_NEEDS_COPY:
            if load_base is None:
                raise ValueError(f"{method}: the reference needs a fresh base model")
            return cls(policy, method, load_base())
        return cls(policy, method)

    @contextlib.contextmanager
    def model(self) -> Iterator[nn.Module]:
        """The network to run for reference log-probs (the policy with its adapter off, or the copy)."""
        if self.copy is not None:
            yield self.copy
            return
        if hasattr(self.policy, "disable_adapter"):
            with self.policy.disable_adapter():
                yield self.policy
            return
        wrapped = [m for m in self.policy.modules() if hasattr(m, "base_layer") and not hasattr(m, "disable_adapters")]
        try:
            for m in wrapped:
                m.forward = m.base_layer.forward  # instance attribute shadows the class's adapter forward
            yield self.policy
        finally:
            for m in wrapped:
                del m.forward

    @torch.no_grad()
    def logprobs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float
    ) -> torch.Tensor:
        T = sequences.shape[1] - prompt_len
        with self.model() as net:
            out = net(
                input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                use_cache=False, logits_to_keep=T + 1,
            )
        logits = out.logits[:, :-1] / (temperature if temperature > 0 else 1.0)
        return logprobs_of(logits, sequences[:, prompt_len:])
