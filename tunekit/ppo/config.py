"""The `ppo:` recipe section. Optimiser, steps, seed, checkpointing come from the shared `train:` section
(train.max_steps = PPO steps, each one rollout batch; train.batch_size = rows per forward/backward pass).
Rewards are the recipe's top-level `rewards:` list (a `tunekit rm` run is `{name: reward_model, path: RUN}`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunekit.config.sections import Section


class PPOConfig(Section):
    # rollouts
    prompts_per_step: int = Field(8, ge=1, description="Prompts sampled per PPO step.")
    samples_per_prompt: int = Field(1, ge=1, description="Responses per prompt (rollout batch = prompts × samples).")
    max_new_tokens: int = Field(48, ge=1, description="Response length budget; longer responses are truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the log-probs use the same one).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts per `generate` call.")
    # optimisation
    epochs: int = Field(4, ge=1, description="PPO epochs over each rollout batch.")
    minibatch_size: int | None = Field(
        None, ge=1, description="Rows per optimizer step within an epoch; default: the whole rollout batch."
    )
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip ε: ρ is kept in [1−ε, 1+ε].")
    value_clip: float | None = Field(0.2, gt=0, description="Value clip: V stays within ±c of V_old (None = off).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (0 = off).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over each rollout batch.")
    # reward shaping
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty against the reference.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimate: k1 = log π/π_ref, k3 ≥ 0.")
    target_kl: float | None = Field(
        None, gt=0, description="Adaptive β toward this KL per response (Ziegler et al. 2019); None = fixed β."
    )
    kl_horizon: int = Field(10000, ge=1, description="Adaptive β horizon (rollouts).")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of responses truncated without EOS."
    )
    whiten_rewards: bool = Field(False, description="Whiten sequence scores over each rollout batch.")
    reward_clip: float | None = Field(None, gt=0, description="Clip sequence scores to [−c, c].")
    # models
    value_model: Literal["shared", "separate"] = Field(
        "shared", description="`shared` = a value head on the policy's backbone; `separate` = its own backbone."
    )
    value_model_name: str | None = Field(
        None, description="`separate`: backbone to start the value model from (a folder or hub id; a reward "
        "model's score head seeds the value head). Default: the policy's base."
    )
    # logging
    samples_every: int = Field(10, ge=0, description="Write rollout samples to samples/ every N steps (0 = off).")

    @model_validator(mode="after")
    def _batches_fit(self) -> PPOConfig:
        rows = self.prompts_per_step * self.samples_per_prompt
        if self.minibatch_size is not None and self.minibatch_size > rows:
            raise ValueError(
                f"ppo.minibatch_size={self.minibatch_size} exceeds the rollout batch "
                f"(prompts_per_step × samples_per_prompt = {rows})"
            )
        return self

    @property
    def rollout_rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt
