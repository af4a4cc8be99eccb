"""Odds Ratio Preference Optimization (Hong et al., 2024, arXiv:2403.07691): SFT and preference alignment in one
stage from the base model, no reference model:

    loss = NLL(y_c) + λ · −log σ(log odds(y_c) − log odds(y_r)),   odds(y) = P(y|x) / (1 − P(y|x)),
    P(y|x) = exp(mean_t log π(y_t | x, y_<t))

The loss is tunekit's own (tunekit/training/pairwise.py: why not TRL's experimental ORPOTrainer).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.reference_free import ReferenceFreeStage
from tunekit.stages.runner import run_stage


class ORPOStage(ReferenceFreeStage):
    name = "orpo"

    def loss(self, recipe: Recipe) -> Any:
        from tunekit.training.pairwise import orpo_loss

        return partial(orpo_loss, lam=recipe.orpo.lambda_)


def run_orpo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy on preference pairs with ORPO; returns the finished run."""
    return run_stage(ORPOStage(), recipe, overwrite=overwrite, resume=resume)
