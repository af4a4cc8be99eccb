"""Rewards for GRPO/PPO and eval: verifiable answers, format, length, sandboxed code tests, reward models.

`get_reward(name, **params)` builds one; `combine(specs)` gives GRPOTrainer's reward_funcs + reward_weights;
`score(specs, prompts, completions, columns)` scores outside a trainer. See docs/rewards.md.
"""

from tunekit.rewards.registry import (
    RewardScores,
    RewardSet,
    RewardSpec,
    combine,
    get_reward,
    register_reward,
    reward_names,
    score,
)
from tunekit.rewards.tracker import RewardTracker

__all__ = [
    "RewardScores",
    "RewardSet",
    "RewardSpec",
    "RewardTracker",
    "combine",
    "get_reward",
    "register_reward",
    "reward_names",
    "score",
]
