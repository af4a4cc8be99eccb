"""PPO for language models (RLHF stage 3): algorithm, rollouts, trainer, recipe section."""
