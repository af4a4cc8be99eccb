"""The PPO-for-language-models math, as pure tensor functions (no models, no I/O).

Shapes: B rows (one sampled response each), T response positions. `mask` is 1.0 on real response tokens
(up to and including the first EOS) and 0.0 on right padding; prompt tokens never appear here (every tensor
is already sliced to the response), so masking the prompt and the padding is the same `mask`.

References: Schulman et al. 2017 (PPO, arXiv:1707.06347); Schulman et al. 2016 (GAE, arXiv:1506.02438);
Ziegler et al. 2019 (KL-penalised RL from human preferences, adaptive KL, arXiv:1909.08593);
Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155); Schulman 2020, "Approximating KL divergence" (k1, k3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m (over `dim`, or everything)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σ m (0 when the mask is empty)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries: Σ m (x − μ)² / (N − 1) (N with `unbiased=False`)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1).clamp(min=1.0) if unbiased else n.clamp(min=1.0)
    return var / denom


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) over the masked entries (μ added back when `shift_mean` is False); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log π(y_t | ·) = log_softmax(logits)[y_t]; logits (B, T, V), ids (B, T) → (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """H(π(·|s_t)) = −Σ_v p_v log p_v per position; (B, T, V) → (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) on tokens sampled from π (Schulman 2020):
    k1 = log π − log π_ref (unbiased, can be negative); k3 = (ρ − 1) − log ρ with ρ = π_ref/π (unbiased, ≥ 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward r_t = −β·KL_t, plus the sequence score at the last real token (Ziegler et al. 2019):
    R = s − β Σ_t KL_t. scores (B,), kl and mask (B, T) → (B, T), 0 on padding."""
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(scores.shape[0], device=scores.device)
    has_tokens = (lengths > 0).to(rewards.dtype)
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right-padded rows:
    δ_t = r_t + γ V_{t+1} − V_t (V past the last real token = 0), A_t = δ_t + γλ A_{t+1}; returns R_t = A_t + V_t.
    (B, T) tensors in, (advantages, returns) out, both 0 on padding."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the active one
    approx_kl: torch.Tensor  # k3 estimate of KL(π_old ‖ π_θ) on the minibatch


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLossOut:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise, averaged over real tokens:
    L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)), ρ_t = π_θ(y_t)/π_old(y_t)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOut(loss, clip_fraction, approx_kl)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in OpenAI baselines' PPO2): ½ mean_t max((V−R)², (V_clip−R)²),
    V_clip = V_old + clip(V − V_old, −c, c); `clip_range` None = plain ½ mean (V−R)². Returns (loss, clip fraction)."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over real tokens: 1 = perfect value function, 0 = no better than a constant."""
    var_r = masked_var(returns, mask)
    if var_r.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)


def normalize_scores(scores: torch.Tensor, whiten: bool = False, clip: float | None = None) -> torch.Tensor:
    """Sequence scores made well-scaled before shaping: optionally whitened over the batch ((s − μ)/σ), then
    clipped to [−clip, clip]."""
    if whiten and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β (Ziegler et al. 2019, §2.2): e = clip(KL/KL_target − 1, −0.2, 0.2), β ← β (1 + e · n / horizon),
    n = rollouts in the batch; β grows when the policy drifts further than the target and shrinks when closer."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
