"""SimPO (Meng et al., 2024, arXiv:2405.14734) and CPO (Xu et al., 2024, arXiv:2401.08417), reference-free:

    SimPO: loss = −log σ(β/|y_c| · log π(y_c|x) − β/|y_r| · log π(y_r|x) − γ)
    CPO:   loss = −log σ(β log π(y_c|x) − β log π(y_r|x)) + α · NLL(y_c)        (simpo.variant: cpo)

The losses are tunekit's own (tunekit/training/pairwise.py: why not TRL's experimental CPOTrainer).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.reference_free import ReferenceFreeStage
from tunekit.stages.runner import Context, run_stage


class SimPOStage(ReferenceFreeStage):
    name = "simpo"

    def loss(self, recipe: Recipe) -> Any:
        from tunekit.training.pairwise import cpo_loss, simpo_loss

        if recipe.simpo.variant == "cpo":
            return partial(cpo_loss, beta=recipe.cpo.beta, alpha=recipe.cpo.alpha)
        return partial(simpo_loss, beta=recipe.simpo.beta, gamma=recipe.simpo.margin)

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        s = ctx.recipe.simpo
        return {**super().finish_card(ctx, trainer), "variant": s.variant,
                **({"gamma": s.margin} if s.variant == "simpo" else {})}


def run_simpo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy on preference pairs with SimPO (or CPO); returns the finished run."""
    return run_stage(SimPOStage(), recipe, overwrite=overwrite, resume=resume)
