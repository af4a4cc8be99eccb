"""PPO learns: on a tiny random Llama, the mean reward (share of vowels in the response) rises within a
bounded number of steps while the KL to the reference stays bounded."""

from __future__ import annotations

import pytest

from tests.ppo_helpers import PROMPTS, build, one_thread, vowel_share  # noqa: F401  (one_thread: fixture)
from tunekit.generation import sample
from tunekit.ppo.config import PPOConfig
from tunekit.ppo.models import Reference
from tunekit.ppo.trainer import PPOTrainer


def held_out_reward(pv, tok, seed=123) -> float:
    """Mean reward of 64 fresh samples (16 per prompt) at temperature 1: the quantity PPO maximises."""
    r = sample(pv.policy, tok, PROMPTS, max_new_tokens=6, temperature=1.0, num_samples=16, batch_size=64, seed=seed)
    return sum(vowel_share(None, r.texts)) / len(r.texts)


@pytest.mark.slow
def test_mean_reward_rises_while_kl_stays_bounded(tiny_model_dir):
    tok, pv, _ = build(tiny_model_dir, "none")
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=8, max_new_tokens=6, epochs=2, minibatch_size=16,
                    kl_coef=0.05)
    trainer = PPOTrainer(pv, Reference.for_policy(pv.policy, "none"), tok, PROMPTS, vowel_share, cfg,
                         steps=30, lr=1e-3, seed=0, forward_batch=16)
    before = held_out_reward(pv, tok)
    rows = trainer.train()
    after = held_out_reward(pv, tok)
    assert after > before + 0.05, (before, after)
    first, last = rows[:10], rows[-10:]
    assert sum(r["reward"] for r in last) > sum(r["reward"] for r in first)
    assert max(r["kl"] for r in rows) < 12.0  # nats per 6-token response; β·KL keeps the policy near π_ref
    for key in ("entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance", "response_length"):
        assert all(key in r for r in rows), key
