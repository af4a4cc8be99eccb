"""One PPO rollout batch: sample responses (tunekit.generation), score them, run the policy/value and the
reference over them, and turn the scores into per-token rewards, advantages and returns.

r_t = −β·KL_t (+ score s on the last response token); (A, R) = GAE(r, V; γ, λ) (Ziegler et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunekit.ppo import algorithm as alg
from tunekit.ppo.config import PPOConfig
from tunekit.ppo.models import PolicyValue, Reference

Prompt = Any  # a string or a message list
# reward_fn(prompts, completions, records, completion_ids) -> (B,) scores. A record is one item of the
# trainer's prompt list: a prompt, or a dict with a "prompt" key and the columns the rewards read.
RewardFn = Callable[[list[Prompt], list[str], list[Any], list[list[int]]], Sequence[float] | torch.Tensor]


def prompt_of(record: Any) -> Prompt:
    return record["prompt"] if isinstance(record, dict) else record


@dataclass
class Experience:
    """Everything the PPO epochs need about one rollout batch (tensors on the training device)."""

    sequences: torch.Tensor  # (B, P + T) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P + T)
    prompt_len: int  # P
    mask: torch.Tensor  # (B, T) float, 1 on response tokens through the first EOS
    logprobs: torch.Tensor  # (B, T) π_old
    ref_logprobs: torch.Tensor  # (B, T) π_ref
    values: torch.Tensor  # (B, T) V_old
    raw_scores: torch.Tensor  # (B,) rewards as scored
    scores: torch.Tensor  # (B,) after EOS penalty, whitening, clipping
    kl: torch.Tensor  # (B, T) per-token KL estimate
    rewards: torch.Tensor  # (B, T) shaped
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    finished: torch.Tensor  # (B,) bool
    texts: list[str]
    prompts: list[Prompt]  # one per row
    records: list[Any]  # one per row

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


def _in_chunks(fn: Callable[[slice], Any], n: int, size: int) -> list[Any]:
    return [fn(slice(i, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def collect(
    model: PolicyValue,
    reference: Reference,
    tok: Any,
    records: list[Any],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    kl_coef: float,
    forward_batch: int,
    seed: int | None = None,
    chat: bool = True,
) -> Experience:
    """Sample, score, and compute old log-probs, values, reference log-probs, rewards and advantages."""
    from tunekit.generation import sample

    prompts = [prompt_of(r) for r in records]
    device = next(model.parameters()).device
    rollout = sample(
        model.policy, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, num_samples=cfg.samples_per_prompt, batch_size=cfg.generation_batch_size, seed=seed,
        chat=chat, backend="transformers",  # vLLM would sample from the saved weights, not the current policy
    )
    sequences = rollout.sequences.to(device)
    attention = rollout.attention_mask.to(device)
    P = rollout.prompt_ids.shape[1]
    mask = rollout.response_mask.to(device=device, dtype=torch.float32)
    rows = list(rollout.prompt_index)
    row_prompts, row_records = [prompts[i] for i in rows], [records[i] for i in rows]
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, rollout.response_mask)]

    raw = reward_fn(row_prompts, list(rollout.texts), row_records, completion_ids)
    raw = torch.as_tensor(raw, dtype=torch.float32).to(device).reshape(-1)
    finished = rollout.finished.to(device)
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
    scores = alg.normalize_scores(scores, whiten=cfg.whiten_rewards, clip=cfg.reward_clip)

    B = sequences.shape[0]

    def policy_pass(s: slice):
        out = model(sequences[s], attention[s], P, cfg.temperature, with_values=True)
        return out.logprobs, out.values

    parts = _in_chunks(policy_pass, B, forward_batch)
    logprobs = torch.cat([p[0] for p in parts]).float()
    values = torch.cat([p[1] for p in parts]).float()
    ref_logprobs = torch.cat(
        _in_chunks(lambda s: reference.logprobs(sequences[s], attention[s], P, cfg.temperature), B, forward_batch)
    ).float()

    kl = alg.per_token_kl(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = alg.shaped_rewards(scores, kl, mask, kl_coef)
    advantages, returns = alg.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = alg.masked_whiten(advantages, mask)
    return Experience(
        sequences=sequences, attention_mask=attention, prompt_len=P, mask=mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, values=values * mask, raw_scores=raw, scores=scores, kl=kl, rewards=rewards,
        advantages=advantages, returns=returns, finished=finished, texts=list(rollout.texts), prompts=row_prompts,
        records=row_records,
    )
