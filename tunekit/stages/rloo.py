"""REINFORCE Leave-One-Out (Ahmadian et al., 2024, "Back to Basics") on TRL 1.16's stable RLOOTrainer.

For each prompt x, k completions y_1..y_k are sampled; r_i = Σ_w w · reward(x, y_i) from the `rewards:` list (the
same registry as grpo and ppo), minus β Σ_t (log π_old − log π_ref) when rloo.beta > 0, and

    A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j      (each sample's baseline is the mean of the other k−1 rewards)

in a clipped sequence-level policy gradient: loss = −mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i), with
ρ_i = π(y_i|x) / π_old(y_i|x). Unlike GRPO there is no division by the group's std and the KL sits in the reward.

The reference (β > 0): the start model, exactly, for every adapter method. PEFT methods (lora, dora, pissa,
milora) get TRL's frozen copy of the freshly initialised adapter ("ref") on the shared base: exact also for PiSSA
and MiLoRA, whose base is rewritten to W_res. Full fine-tuning, LoRA-XS and SVFT get a frozen copy of the start
model loaded by tunekit (a chained run folded in, the recipe's dtype and quantization), one more copy of the
weights in memory: TRL would rebuild it from `config.name_or_path`, which misses a chained run's fold. (LoRA-XS
starts its R at std `adapter.lora_xs_init_std`, so its first policy differs from that copy by as little.)
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.grpo import CompletionsCallback, GRPOStage, install_reference
from tunekit.stages.runner import Context, run_stage


class RLOOStage(GRPOStage):
    """GRPO's data step (prompts, reward columns checked before the model loads) and completions log; TRL's
    RLOOTrainer."""

    name = "rloo"

    def build_trainer(self, ctx: Context) -> Any:
        from trl import RLOOConfig, RLOOTrainer

        from tunekit.generation import _vllm_usable
        from tunekit.models.load import load_model
        from tunekit.rewards import RewardTracker

        r, o = ctx.recipe, ctx.recipe.rloo
        own_reference = o.beta > 0 and r.adapter.method not in common.PEFT_METHODS
        args = common.training_arguments(
            r, ctx.run, RLOOConfig,
            num_generations=o.num_generations,
            max_completion_length=o.max_completion_length,
            temperature=o.temperature,
            top_p=o.top_p,
            beta=0.0 if own_reference else o.beta,
            epsilon=o.epsilon,
            num_iterations=o.num_iterations,
            normalize_advantages=o.normalize_advantages,
            mask_truncated_completions=o.mask_truncated_completions,
            reward_weights=self.rewards.weights,
            use_vllm=_vllm_usable() if o.use_vllm is None else o.use_vllm,
            log_completions=False,
            disable_dropout=True,
        )
        watch = RewardTracker(max_completion_length=o.max_completion_length)
        completions = CompletionsCallback(ctx.run.path / "completions.jsonl", o.log_completions_steps, watch,
                                          dict(zip(self.rewards.names, self.rewards.weights)))
        trainer = self.trl_trainer(ctx, RLOOTrainer, args, completions, reward_funcs=self.rewards.funcs)
        if own_reference:
            install_reference(trainer, load_model(common.base_model_config(r), ctx.tokenizer), o.beta)
        completions.trainer = trainer
        return trainer

    def save(self, ctx: Context, trainer: Any) -> Any:
        """The trained adapter only: TRL's frozen "ref" adapter copy is dropped before saving."""
        peft_config = getattr(ctx.model, "peft_config", None)
        if isinstance(peft_config, dict) and "ref" in peft_config:
            ctx.model.delete_adapter("ref")
        return super().save(ctx, trainer)

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        o, method = ctx.recipe.rloo, ctx.recipe.adapter.method
        reference = ("none (rloo.beta 0)" if o.beta == 0 else
                     "frozen copy of the initial adapter on the shared base" if method in common.PEFT_METHODS else
                     "frozen copy of the start model")
        return {"rloo": {"num_generations": o.num_generations, "beta": o.beta, "reference": reference}}


def run_rloo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy with RLOO on prompts and the recipe's rewards; returns the finished run."""
    return run_stage(RLOOStage(), recipe, overwrite=overwrite, resume=resume)
