"""Recipe sections of the preference and RL stages, beside `train`: `rm:`, `dpo:`, `grpo:`.

Each section belongs to one stage (`STAGE_SECTIONS`); a recipe for another stage that sets it is an error that
names the stage it belongs to. Names TRL would only reject at the first training step (DPO loss types, GRPO loss
types) are checked here, when the recipe is read.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunekit.config.sections import Section

# TRL 1.16 DPOTrainer.dpo_loss, one branch per name (trl/trainer/dpo_trainer.py).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# TRL 1.16 GRPOConfig.loss_type.
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")


def _did_you_mean(value: str, valid: tuple[str, ...]) -> str:
    import difflib

    match = difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class RMConfig(Section):
    """Bradley-Terry reward model (Ouyang et al., 2022): loss = −log σ(r(x, y_c) − r(x, y_r) − m)."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Add c·(r_c + r_r)² to keep rewards centred at 0 (Eisenstein et al., 2023)."
    )


class DPOConfig(Section):
    """Direct Preference Optimization (Rafailov et al., 2023):
    loss = −log σ(β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])."""

    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint to the reference.")
    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL 1.16 loss: sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, "
        "aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm; a list combines them.",
    )
    loss_weights: list[float] | None = Field(None, description="Weights of a list of loss types (e.g. MPO).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label-noise rate (cDPO, robust).")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once before training (no reference model in memory)."
    )
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="Which end of a too-long prompt+response pair is kept (data.max_length)."
    )

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            if name not in DPO_LOSS_TYPES:
                raise ValueError(f"unknown DPO loss '{name}'{_did_you_mean(name, DPO_LOSS_TYPES)}; "
                                 f"known: {', '.join(DPO_LOSS_TYPES)}")
        return v

    @model_validator(mode="after")
    def _weights_match(self) -> DPOConfig:
        n = 1 if isinstance(self.loss_type, str) else len(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != n:
            raise ValueError(f"dpo.loss_weights has {len(self.loss_weights)} weights for {n} loss types")
        if self.loss_weights is not None and (any(w < 0 for w in self.loss_weights) or not any(self.loss_weights)):
            raise ValueError(f"dpo.loss_weights {self.loss_weights}: weights must be >= 0 and not all 0 (a negative "
                             "weight maximises that loss)")
        return self

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)


class GRPOConfig(Section):
    """Group Relative Policy Optimization (Shao et al., 2024): advantages A_i = (r_i − mean_G r) / std_G r over
    the G completions of one prompt, in a clipped policy-gradient objective (− β·KL to the reference if β > 0)."""

    num_generations: int = Field(4, ge=2, description="G: completions sampled per prompt.")
    max_completion_length: int = Field(128, ge=1, description="Token budget of each completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (0 = no reference model).")
    epsilon: float = Field(0.2, gt=0, description="Clip range ε of the importance ratio.")
    num_iterations: int = Field(1, ge=1, description="Policy updates per batch of generations (μ).")
    loss_type: str = Field("dapo", description="grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo (TRL 1.16).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO)."
    )
    mask_truncated_completions: bool = Field(
        False, description="Exclude completions cut at max_completion_length from the loss (DAPO)."
    )
    use_vllm: bool | None = Field(None, description="Generate with vLLM (default: when installed on a GPU).")
    log_completions_steps: int = Field(10, ge=0, description="Write completions to completions.jsonl every N steps.")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss '{v}'{_did_you_mean(v, GRPO_LOSS_TYPES)}; "
                             f"known: {', '.join(GRPO_LOSS_TYPES)}")
        return v


#: stage -> the sections only it reads (besides model, data, adapter, train, generate, output).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "sft": (),
    "rm": ("rm",),
    "dpo": ("dpo",),
    "grpo": ("grpo", "rewards"),
    "ppo": ("ppo", "rewards"),
    "cai": ("cai", "dpo"),
}
