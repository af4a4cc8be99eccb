"""Recipe sections of the preference and RL stages, beside `train`: `rm:`, `dpo:`, `grpo:`, `ppo:`, `cai:`,
`kto:`, `orpo:`, `simpo:`, `cpo:`, `rloo:`, `distill:`.

Each section belongs to one stage (`STAGE_SECTIONS`); a recipe for another stage that sets it is an error that
names the stage it belongs to. Names TRL would only reject at the first training step (DPO loss types, GRPO loss
types) are checked here, when the recipe is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


def _vllm_installed(value: bool | None, key: str) -> bool | None:
    """`use_vllm: true` needs the vllm package: refused when the recipe is read, not when the trainer starts."""
    import importlib.util

    if value and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"{key}: vLLM is not installed (pip install vllm, on a CUDA GPU); set {key}: false to "
                         "generate with transformers, or leave it unset (vLLM when installed on a GPU)")
    return value


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
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="`token`: one ratio π/π_old per token (GRPO); `sequence`: GSPO (Zheng et al., 2025), "
        "one length-normalised ratio per completion, s_i = exp(mean_t log(π/π_old)), with loss_type grpo."
    )

    @field_validator("use_vllm")
    @classmethod
    def _vllm_is_installed(cls, v: bool | None) -> bool | None:
        return _vllm_installed(v, "grpo.use_vllm")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss '{v}'{_did_you_mean(v, GRPO_LOSS_TYPES)}; "
                             f"known: {', '.join(GRPO_LOSS_TYPES)}")
        return v

    @model_validator(mode="after")
    def _sequence_ratio_needs_a_sequence_loss(self) -> GRPOConfig:
        """TRL only warns; a GSPO ratio under a token-summing loss is not GSPO's objective, so refuse it here."""
        if self.importance_sampling_level == "sequence" and self.loss_type in SEQUENCE_LEVEL_REFUSED:
            raise ValueError(
                f"grpo.importance_sampling_level: sequence (GSPO) needs a per-sequence loss, and loss_type "
                f"'{self.loss_type}' sums token terms (each completion weighted by its length); set "
                "grpo.loss_type: grpo (GSPO's objective), sapo or luspo")
        return self


# Loss types whose token sums (or own sequence weights, vespo) make a sequence-level ratio something else than GSPO.
SEQUENCE_LEVEL_REFUSED = ("dapo", "bnpo", "dr_grpo", "cispo", "vespo")


class RLOOConfig(Section):
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024): for the k completions of a prompt,
    A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j, in a clipped sequence-level policy gradient; with β > 0 the reward is
    r_i − β Σ_t (log π_old − log π_ref) (the KL estimate folded into the reward, as in the paper)."""

    num_generations: int = Field(4, ge=2, description="k: completions sampled per prompt (the baseline uses k−1).")
    max_completion_length: int = Field(128, ge=1, description="Token budget of each completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(0.05, ge=0, description="KL penalty in the reward (0 = no reference model).")
    epsilon: float = Field(0.2, gt=0, description="Clip range ε of the sequence ratio π/π_old.")
    num_iterations: int = Field(1, ge=1, description="Policy updates per batch of generations (μ).")
    normalize_advantages: bool = Field(False, description="Scale advantages to mean 0, std 1 over the batch.")
    mask_truncated_completions: bool = Field(
        False, description="Exclude completions cut at max_completion_length from the loss (DAPO)."
    )
    use_vllm: bool | None = Field(None, description="Generate with vLLM (default: when installed on a GPU).")
    log_completions_steps: int = Field(10, ge=0, description="Write completions to completions.jsonl every N steps.")

    @field_validator("use_vllm")
    @classmethod
    def _vllm_is_installed(cls, v: bool | None) -> bool | None:
        return _vllm_installed(v, "rloo.use_vllm")


class DistillConfig(Section):
    """On-policy distillation (Agarwal et al., 2024, GKD): on a share λ of the batches the student answers the
    prompts itself, else the data's answers are used; the loss is the generalised JSD per completion token,
    JSD_β = β KL(p_T ‖ m) + (1−β) KL(p_S ‖ m), m = β p_T + (1−β) p_S (β = 0: forward KL(p_T ‖ p_S),
    β = 1: reverse KL(p_S ‖ p_T))."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    teacher: str | None = Field(
        None, description="The teacher: anything tunekit loads (alias, model folder, hub id, a run directory or "
        "adapter, folded in), with the student's `model` options (dtype, 4/8-bit, attention), frozen. It must share "
        "the student's tokenizer (checked before any work)."
    )
    lambda_: float = Field(
        1.0, ge=0, le=1, alias="lambda",
        description="λ: share of batches the student generates itself (on-policy); the rest use the data's "
        "answers (supervised KD, needs conversations or prompt/completion records).",
    )
    beta: float = Field(0.5, ge=0, le=1, description="β of the generalised JSD: 0 forward KL, 1 reverse KL.")
    temperature: float = Field(1.0, gt=0, description="Temperature of the sampling and of both distributions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the student's own answers.")
    max_completion_length: int = Field(128, ge=1, description="Token budget of each completion.")
    use_vllm: bool | None = Field(None, description="Generate with vLLM (default: when installed on a GPU).")

    @field_validator("use_vllm")
    @classmethod
    def _vllm_is_installed(cls, v: bool | None) -> bool | None:
        return _vllm_installed(v, "distill.use_vllm")


class PPOConfig(Section):
    """PPO with a learned value (Schulman et al., 2017; RLHF as Ouyang et al., 2022): the clipped objective
    min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) on GAE advantages of the KL-shaped reward. Optimiser, steps, seed and
    checkpointing come from `train:` (train.max_steps = PPO steps, one rollout batch each); rewards are the
    recipe's top-level `rewards:` list (a `tunekit rm` run is `{name: reward_model, path: RUN}`)."""

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

    @model_validator(mode="after")
    def _value_model_name_needs_separate(self) -> PPOConfig:
        if self.value_model == "shared" and self.value_model_name is not None:
            raise ValueError(
                f"ppo.value_model_name: no effect with ppo.value_model: shared (the value head sits on the "
                f"policy's backbone); set ppo.value_model: separate to start the value model from "
                f"'{self.value_model_name}', or remove ppo.value_model_name"
            )
        return self

    @property
    def rollout_rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


class CaiConfig(BaseModel):
    """Constitutional AI (Bai et al., 2022, arXiv:2212.08073): phase 1 critiques and revises answers against
    sampled principles and fine-tunes on the revisions (an `sft` sub-run); phase 2 trains with DPO on the feedback
    model's judgements of response pairs (a `dpo` sub-run). See tunekit/stages/cai.py."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    constitution: str | None = Field(
        None, description="Constitution YAML (see docs/cai.md); default: the shipped helpful/honest/harmless one."
    )
    prompts: str | None = Field(
        None, description="Prompt jsonl (`prompt`: string or message list); default: the shipped red-team prompts."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts (None = all).")
    eval_prompts: str | None = Field(
        "heldout",
        description="Prompts of the `eval` phase (final vs start model, judged by the feedback model): a jsonl, "
        "`heldout` = the shipped held-out split, null = skip the phase.",
    )
    eval_max_prompts: int | None = Field(None, ge=1, description="Use at most this many eval prompts.")
    critic_model: str | None = Field(None, description="Model that writes critiques; default: the policy itself.")
    feedback_model: str | None = Field(
        None, description="Model that judges response pairs in phase 2; default: `model.name` (the start model)."
    )
    revision_rounds: int = Field(1, ge=1, le=8, description="Critique → revision rounds per prompt (phase 1).")
    few_shot: bool = Field(True, description="Prepend a principle's examples to its critique/revision requests.")
    max_new_tokens: int = Field(96, ge=1, description="Length budget of answers and revisions.")
    critique_max_new_tokens: int = Field(64, ge=1, description="Length budget of critiques.")
    temperature: float = Field(0.0, ge=0, description="Phase-1 sampling temperature (0 = greedy).")
    pair_temperature: float = Field(
        1.0, gt=0, description="Phase 2: temperature of the two responses sampled per prompt."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (when sampling).")
    principles_per_judgement: int = Field(
        2, ge=1, description="Principles sampled per pair; the preference is averaged over them and both orders."
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="Drop pairs whose confidence |2p − 1| is below this (0 = keep all)."
    )
    generation_batch_size: int = Field(8, ge=1, description="Prompts per generation / scoring batch.")
    sft_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe keys set on the phase-1 SFT sub-run, e.g. `{train.max_steps: 20}`."
    )
    dpo_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe keys set on the phase-2 DPO sub-run, e.g. `{dpo.beta: 0.1}`."
    )


class KTOConfig(Section):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired feedback, r = log π(y|x) − log π_ref(y|x):
    loss = w_D (1 − σ(β(r − z₀))) for desirable, w_U (1 − σ(β(z₀ − r))) for undesirable y; z₀ = batch KL estimate."""

    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint to the reference.")
    desirable_weight: float = Field(
        1.0, gt=0, description="λ_D: weight of desirable records (the paper: λ_D·n_D / λ_U·n_U in [1, 4/3])."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: weight of undesirable records.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto, or apo_zero_unpaired (APO-zero without the KL estimate; D'Oosterlinck et al., 2024)."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once before training (no reference model in memory)."
    )


class ORPOConfig(Section):
    """Odds Ratio Preference Optimization (Hong et al., 2024), reference-free, from the base model in one stage:
    loss = NLL(y_c) + λ · −log σ(log odds(y_c) − log odds(y_r)), odds(y) = P(y)/(1 − P(y)), P = per-token mean prob."""

    lambda_: float = Field(0.1, alias="lambda", gt=0, description="λ: weight of the odds-ratio term (paper: 0.1).")


SIMPO_VARIANTS = ("simpo", "cpo")


class SimPOConfig(Section):
    """SimPO (Meng et al., 2024), reference-free: loss = −log σ(β/|y_c| log π(y_c|x) − β/|y_r| log π(y_r|x) − γ).
    `variant: cpo` trains CPO (Xu et al., 2024) instead, with the `cpo:` keys."""

    variant: Literal["simpo", "cpo"] = Field("simpo", description="simpo, or cpo (its keys under `cpo:`).")
    beta: float = Field(2.0, gt=0, description="β: reward scale of the length-normalised log-prob (paper: 2.0-2.5).")
    gamma: float | None = Field(None, ge=0, description="γ: target reward margin; default β · gamma_beta_ratio.")
    gamma_beta_ratio: float = Field(0.5, ge=0, description="γ/β when `gamma` is unset (paper: 0.3-0.8).")

    @model_validator(mode="after")
    def _one_margin(self) -> SimPOConfig:
        if self.gamma is not None and "gamma_beta_ratio" in self.model_fields_set:
            raise ValueError("simpo.gamma: set either simpo.gamma or simpo.gamma_beta_ratio, not both")
        return self

    @property
    def margin(self) -> float:
        """γ."""
        return self.gamma if self.gamma is not None else self.beta * self.gamma_beta_ratio


class CPOConfig(Section):
    """Contrastive Preference Optimization (Xu et al., 2024), reference-free (`simpo.variant: cpo`):
    loss = −log σ(β log π(y_c|x) − β log π(y_r|x)) + α · NLL(y_c)."""

    beta: float = Field(0.1, gt=0, description="β: scale of the summed log-prob difference (paper: 0.1).")
    alpha: float = Field(1.0, ge=0, description="α: weight of the NLL term on the chosen answer (paper: 1.0).")


#: stage -> the sections only it reads (besides model, data, adapter, train, generate, output).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "sft": (),
    "rm": ("rm",),
    "dpo": ("dpo",),
    "grpo": ("grpo", "rewards"),
    "ppo": ("ppo", "rewards"),
    "cai": ("cai", "dpo"),
    "kto": ("kto",),
    "orpo": ("orpo",),
    "simpo": ("simpo", "cpo"),
    "rloo": ("rloo", "rewards"),
    "distill": ("distill",),
}
