"""Reward model (Bradley-Terry; Ouyang et al., 2022) on TRL 1.16's RewardTrainer:

    loss = −log σ(r(x, y_c) − r(x, y_r) − m),   m = the pair's margin (0 when absent)

r is the backbone with a one-output `score` head (AutoModelForSequenceClassification, num_labels=1). With an
adapter the head trains in full and is saved with it (PEFT SEQ_CLS + modules_to_save), so a reloaded reward
model scores exactly like the trained one. Eval reports pairwise accuracy P[r(x, y_c) > r(x, y_r)].
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.preference import PreferenceStage
from tunekit.stages.runner import Context, run_stage


class RewardModelStage(PreferenceStage):
    name = "rm"
    drop_rule = "pair"  # TRL's RewardTrainer drops pairs longer than max_length

    def load_model(self, recipe: Recipe, tok: Any) -> tuple[Any, Any]:
        return common.load_trainable(recipe, tok, task="seq_cls")

    def build_trainer(self, ctx: Context) -> Any:
        from trl import RewardConfig, RewardTrainer

        r = ctx.recipe
        args = common.training_arguments(
            r, ctx.run, RewardConfig,
            max_length=r.data.max_length,
            center_rewards_coefficient=r.rm.center_rewards_coefficient,
            disable_dropout=True,
        )
        return self.trl_trainer(ctx, RewardTrainer, args)

    def evaluate(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        from tunekit.console import console

        metrics = super().evaluate(ctx, trainer)
        if "eval_accuracy" in metrics:
            console.print(f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f}")
        return metrics

    def write_samples(self, ctx: Context) -> None:
        """Scores of held-out pairs (a reward model does not generate)."""
        import json

        from tunekit.evaluation.preference import reward_pair_scores

        pairs = ctx.data.extra.get("eval_pairs", [])[: max(ctx.recipe.generate.samples, 0)]
        if not pairs:
            return
        scores = reward_pair_scores(ctx.model, ctx.tokenizer, pairs, ctx.recipe.data.max_length)
        with (ctx.run.path / "samples.jsonl").open("w") as fh:
            for p, (c, rj) in zip(pairs, scores):
                fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen[-1]["content"],
                                     "rejected": p.rejected[-1]["content"], "reward_chosen": c,
                                     "reward_rejected": rj}, ensure_ascii=False) + "\n")


def run_rm(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a Bradley-Terry reward model on preference pairs; returns the finished run."""
    return run_stage(RewardModelStage(), recipe, overwrite=overwrite, resume=resume)
