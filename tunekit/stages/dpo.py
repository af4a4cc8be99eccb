"""Direct Preference Optimization (Rafailov et al., NeurIPS 2023) on TRL 1.16's DPOTrainer:

    loss = −log σ(β [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

The reference is the model the run starts from (for a chained run: the earlier run's folded result). With a
PEFT adapter (LoRA, DoRA, PiSSA, MiLoRA, QLoRA) TRL keeps a frozen copy of the freshly initialised adapter as the
"ref" adapter: base weights are shared (one copy), only the small adapter tensors are doubled. This is exact
also for PiSSA/MiLoRA, whose base is rewritten to W_res, where merely disabling the adapter would NOT give the
start model. LoRA-XS, SVFT and full fine-tuning use reference log-probs computed once before training (the start
model; no second copy of anything).
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.preference import PreferenceStage
from tunekit.stages.runner import Context, run_stage


class DPOStage(PreferenceStage):
    name = "dpo"

    def drop_rule_for(self, recipe: Recipe) -> str | None:
        """TRL drops pairs whose prompt fills max_length with keep_start; keep_end keeps the answers' ends."""
        return "prompt" if recipe.dpo.truncation_mode == "keep_start" else None

    def build_trainer(self, ctx: Context) -> Any:
        from trl import DPOConfig, DPOTrainer

        r = ctx.recipe
        args = common.training_arguments(
            r, ctx.run, DPOConfig,
            beta=r.dpo.beta,
            loss_type=r.dpo.loss_types,
            loss_weights=r.dpo.loss_weights,
            label_smoothing=r.dpo.label_smoothing,
            precompute_ref_log_probs=common.uses_precomputed_reference(r, r.dpo),
            max_length=r.data.max_length,
            truncation_mode=r.dpo.truncation_mode,
            disable_dropout=True,
        )
        return self.trl_trainer(ctx, DPOTrainer, args, ref_model=None)

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        precomputed = common.uses_precomputed_reference(ctx.recipe, ctx.recipe.dpo)
        return {"reference": "precomputed log-probs of the start model" if precomputed
                else "frozen copy of the initial adapter on the shared base"}


def run_dpo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy on preference pairs with DPO; returns the finished run."""
    return run_stage(DPOStage(), recipe, overwrite=overwrite, resume=resume)
