"""The `ppo:` recipe section, beside the PPO trainer that reads it. It is defined with the other stage sections
in `tunekit.config.stages` (the recipe schema's floor), so the schema never imports the PPO package."""

from tunekit.config.stages import PPOConfig

__all__ = ["PPOConfig"]
