"""Supervised fine-tuning: next-token cross-entropy on assistant tokens.

loss = −(1/N) Σ_{t ∈ assistant} log p_θ(x_t | x_<t), N = number of assistant tokens in the batch.
The stage is its data (tokenized conversations, optionally packed) and a transformers `Trainer` over the
shared runner (tunekit/stages/runner.py).
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.runner import Context, Stage, StageData, run_stage


class SFTStage(Stage):
    name = "sft"

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from tunekit.data.pipeline import build_sft_data

        data = build_sft_data(recipe.data, tok, recipe.train.seed)
        prompts, refs = common.held_out_prompts(data.eval_messages)
        return StageData(
            data.train, data.eval, data.stats.fingerprint, data.stats.summary(), data.stats.__dict__,
            sample_prompts=prompts, sample_references=refs,
        )

    def build_trainer(self, ctx: Context) -> Any:
        from tunekit.data.collate import SFTCollator
        from tunekit.training.trainer import TunekitTrainer

        ctx.collator = SFTCollator(ctx.tokenizer.pad_token_id, padding_free=ctx.recipe.data.packing)
        ctx.callbacks = common.standard_callbacks(ctx.run, ctx.collator)
        return TunekitTrainer(
            loss_impl=ctx.recipe.train.loss_impl, kernels=ctx.recipe.train.kernels,
            model=ctx.model,
            args=common.training_arguments(ctx.recipe, ctx.run),
            train_dataset=ctx.data.train,
            eval_dataset=ctx.data.eval,
            data_collator=ctx.collator,
            callbacks=ctx.callbacks,
        )

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        return {"padding_share": round(ctx.collator.padding_share, 4)}


def run_sft(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train, save and evaluate; returns the finished run directory and the trained model."""
    return run_stage(SFTStage(), recipe, overwrite=overwrite, resume=resume)
