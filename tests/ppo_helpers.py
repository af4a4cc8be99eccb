"""Shared pieces of the PPO tests: a tiny policy with a value head, prompts, a toy reward."""

from __future__ import annotations

import pytest
import torch

from tunekit.adapters import AttachContext, attach
from tunekit.config.schema import AdapterConfig, ModelConfig
from tunekit.models.load import load_model, load_tokenizer
from tunekit.ppo.models import PolicyValue, ValueHead, disable_dropout, hidden_size_of


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["Say hello.", "Add 2 and 3.", "Capital of France?", "Count to three."]


def vowel_share(prompts, texts, *unused):
    """Toy reward: the share of vowels among the response's characters."""
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]


def build(model_dir, method="lora", seed=0):
    mc = ModelConfig(name=str(model_dir))
    tok = load_tokenizer(mc)
    torch.manual_seed(seed)
    policy = attach(load_model(mc, tok), AdapterConfig(method=method, r=4, dropout=0.0), AttachContext())
    disable_dropout(policy)
    return tok, PolicyValue(policy, ValueHead(hidden_size_of(policy))), mc


def vowel_reward(prompts=None, completions=None, **columns):
    """The toy reward as a registry reward (`name: python:tests.ppo_helpers:vowel_reward`)."""
    return vowel_share(prompts, completions)


def slow_vowel_reward(prompts=None, completions=None, **columns):
    """`vowel_reward` taking at least 0.5 s a call: a step then outlasts the polling of a test that waits for a
    checkpoint to appear (on a loaded machine the tiny model's steps are shorter than a starved poller's naps)."""
    import time

    time.sleep(0.5)
    return vowel_share(prompts, completions)
