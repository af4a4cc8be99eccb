"""The `cai:` recipe section: Constitutional AI (Bai et al., 2022, arXiv:2212.08073) as a tunekit stage.

Phase 1 (SL-CAI) critiques and revises the policy's answers against sampled principles and fine-tunes on the
final revisions; phase 2 (RL-CAI) turns the feedback model's multiple-choice judgements of response pairs into
a preference dataset and trains on it with DPO. The shared sections (model, data, adapter, train, generate)
configure the derived `sft` and `dpo` sub-runs; `data.train`, when set, is helpfulness data mixed into phase 1.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CaiConfig(BaseModel):
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
