"""The stages that learn from preference pairs without a reference model (orpo, simpo with its cpo variant).

Pairs are read like dpo's (tunekit/stages/preference.py), rendered with the run's chat template and tokenized
once (`conversation_ids`, the same rendering `tunekit eval` scores), and trained by `PairwiseTrainer`
(tunekit/training/pairwise.py) with the stage's loss. No reference model is loaded, for any adapter method:
memory is the policy's alone. Held-out preference accuracy = P[reward(y_c) > reward(y_r)] with the method's own
reward (SimPO/ORPO: the per-token mean log-prob; CPO: the summed log-prob).
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.stages import common
from tunekit.stages.preference import RULES, PreferenceStage, all_dropped
from tunekit.stages.runner import Context, StageData


def tokenize_pairs(tok: Any, rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """(token rows for PairCollator, pairs dropped because the prompt leaves no answer token in max_length)."""
    from tunekit.evaluation.preference import conversation_ids

    out, dropped = [], 0
    for r in rows:
        c_ids, c_start = conversation_ids(tok, r["prompt"], r["chosen"], max_length)
        r_ids, r_start = conversation_ids(tok, r["prompt"], r["rejected"], max_length)
        if c_start >= len(c_ids) or r_start >= len(r_ids):
            dropped += 1
            continue
        out.append({"chosen_ids": c_ids, "chosen_start": c_start, "rejected_ids": r_ids, "rejected_start": r_start})
    return out, dropped


class ReferenceFreeStage(PreferenceStage):
    """A pairwise stage: its `loss(recipe)` → loss_fn(PairLogps) and `reward_kind` (mean or sum log-prob)."""

    def loss(self, recipe: Recipe) -> Any:
        raise NotImplementedError

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from datasets import Dataset

        data = super().load_data(recipe, tok)
        n = recipe.data.max_length
        train, dropped = tokenize_pairs(tok, list(data.train), n)
        evals, dropped_eval = tokenize_pairs(tok, list(data.eval), n) if data.eval is not None else ([], 0)
        why = RULES["prompt"][1]  # the same rule as dpo/kto: no answer token within max_length
        if not train:
            raise all_dropped(recipe, "train", dropped, "preference pair", why)
        if dropped_eval and not evals:
            raise all_dropped(recipe, "eval", dropped_eval, "preference pair", why)
        if dropped or dropped_eval:
            data.summary += f"; dropped {dropped + dropped_eval} pairs whose prompt fills data.max_length={n}"
        data.counts.update(dropped_too_long=dropped, dropped_too_long_eval=dropped_eval)
        data.train = Dataset.from_list(train)
        data.eval = Dataset.from_list(evals) if evals else None
        return data

    def build_trainer(self, ctx: Context) -> Any:
        from tunekit.training.pairwise import PairCollator, PairwiseTrainer

        r = ctx.recipe
        ctx.callbacks = common.standard_callbacks(ctx.run, None)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        return PairwiseTrainer(
            loss_fn=self.loss(r), loss_impl=r.train.loss_impl,
            model=ctx.model,
            args=common.training_arguments(r, ctx.run),
            train_dataset=ctx.data.train,
            eval_dataset=ctx.data.eval,
            data_collator=PairCollator(pad),
            callbacks=ctx.callbacks,
        )

    def evaluate(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        metrics = super().evaluate(ctx, trainer)
        if "eval_rewards/accuracies" in metrics:
            console.print(f"held-out preference accuracy {metrics['eval_rewards/accuracies']:.3f}")
        return metrics

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        return {"reference": "none (reference-free loss)"}
