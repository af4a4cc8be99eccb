"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306) on TRL 1.16's stable KTOTrainer:

    r(x, y) = log π(y|x) − log π_ref(y|x),   z₀ = max(0, mean_batch [log π(y'|x) − log π_ref(y'|x)])
    loss = mean over the batch of  λ_D (1 − σ(β (r − z₀)))  (desirable y)  |  λ_U (1 − σ(β (z₀ − r)))  (undesirable y)

z₀ is the batch KL estimate: each prompt x with the answer y' of its neighbour in the batch (TRL rotates the
answers of each batch by one), gradient-free. Data are unpaired records {prompt, completion, label} (or pairs,
split into one desirable and one undesirable record). TRL needs the batches in a fixed order for that rotation,
so records are shuffled once when read (seeded, after splitting pairs) and then taken in order.

The reference is the model the run starts from, as in dpo (tunekit/stages/dpo.py): for LoRA/DoRA/QLoRA, whose
fresh adapter adds zero, the model with its adapters disabled; a frozen copy of the initial adapter for
PiSSA/MiLoRA (their base is rewritten); log-probs precomputed once for LoRA-XS, SVFT and full fine-tuning.
"""

from __future__ import annotations

import logging
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.stages import common
from tunekit.stages.common import ZERO_START_METHODS, uses_precomputed_reference
from tunekit.stages.preference import drop_unfit
from tunekit.stages.runner import Context, Stage, StageData, run_stage


def weight_advice(n_desirable: int, n_undesirable: int, w_d: float, w_u: float) -> str | None:
    """The paper's advice (§4.2, eq. 8) when the classes are imbalanced: λ_D·n_D / (λ_U·n_U) in [1, 4/3]; None when
    the weights already satisfy it."""
    if not n_desirable or not n_undesirable:
        return None
    ratio = (w_d * n_desirable) / (w_u * n_undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    lo, hi = n_undesirable * w_u / n_desirable, 4 / 3 * n_undesirable * w_u / n_desirable
    u_lo, u_hi = 3 / 4 * n_desirable * w_d / n_undesirable, n_desirable * w_d / n_undesirable
    return (f"kto: {n_desirable} desirable vs {n_undesirable} undesirable records give λ_D·n_D / λ_U·n_U = "
            f"{ratio:.2f}; the KTO paper (Ethayarajh et al., 2024, eq. 8) advises 1 to 4/3: set EITHER "
            f"kto.desirable_weight in [{lo:.2f}, {hi:.2f}] OR kto.undesirable_weight in [{u_lo:.2f}, {u_hi:.2f}]")


class _DropRepeatedAdvice(logging.Filter):
    """TRL's KTOTrainer logs the same advice again when it reads the data; ours (above) is printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "desirable_weight in" not in record.getMessage()


def _rows_shuffled(seed: int) -> Any:
    """to_rows for record_data: pairs split into two records, then the training records shuffled (seeded) so that
    a pair's halves are not neighbours: TRL's KL estimate pairs each prompt with its neighbour's answer."""

    def to_rows(split: Any) -> tuple[list, list, dict[str, Any], str]:
        import random

        from tunekit.data.preference import unpair

        train, held = unpair(split.train), unpair(split.eval)
        random.Random(seed).shuffle(train)
        n_d = sum(r.label for r in train)
        counts = {"train_desirable": n_d, "train_undesirable": len(train) - n_d}
        return ([r.as_row() for r in train], [r.as_row() for r in held], counts,
                f"; {n_d} desirable / {len(train) - n_d} undesirable")

    return to_rows


class KTOStage(Stage):
    name = "kto"

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from tunekit.data.preference import PreferencePair, to_feedback

        def answer(r: Any) -> str:
            return (r.chosen if isinstance(r, PreferencePair) else r.completion)[-1]["content"]

        data = common.record_data(recipe, to_feedback, "record", "records", _rows_shuffled(recipe.train.seed), answer)
        data = drop_unfit(recipe, tok, data, "prompt", "record")  # TRL drops records whose prompt fills max_length
        data.extra["eval_pairs"] = [p for p in data.extra["eval_records"] if isinstance(p, PreferencePair)]
        advice = weight_advice(data.counts["train_desirable"], data.counts["train_undesirable"],
                               recipe.kto.desirable_weight, recipe.kto.undesirable_weight)
        if advice:
            console.print(f"[yellow]warning: {advice}[/yellow]")
        return data

    def build_trainer(self, ctx: Context) -> Any:
        from trl import KTOConfig, KTOTrainer

        r = ctx.recipe
        args = common.training_arguments(
            r, ctx.run, KTOConfig,
            beta=r.kto.beta,
            desirable_weight=r.kto.desirable_weight,
            undesirable_weight=r.kto.undesirable_weight,
            loss_type=r.kto.loss_type,
            precompute_ref_log_probs=uses_precomputed_reference(r, r.kto),
            max_length=r.data.max_length,
            disable_dropout=True,
            train_sampling_strategy="sequential",  # the KL estimate pairs each record with its batch neighbour
        )
        trl_log = logging.getLogger("trl.trainer.kto_trainer")
        if not any(isinstance(f, _DropRepeatedAdvice) for f in trl_log.filters):
            trl_log.addFilter(_DropRepeatedAdvice())
        trainer = self.trl_trainer(ctx, KTOTrainer, args, ref_model=None)
        peft_config = getattr(trainer.model, "peft_config", {})
        if r.adapter.method in ZERO_START_METHODS and "ref" in peft_config:
            # TRL copied the fresh adapter into a frozen "ref" adapter for both reference passes; it adds zero, so
            # the adapters disabled give the same reference at the base model's cost (TRL's own path when "ref" is
            # absent): 1.09x the step time saved (docs/benchmarks.md)
            trainer.model.delete_adapter("ref")
        return trainer

    def evaluate(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        """The trainer's held-out KTO loss, and for held-out pairs the implicit-reward preference accuracy
        P[β r(x, y_c) > β r(x, y_r)] against the start model (as `tunekit eval` measures it)."""
        metrics = super().evaluate(ctx, trainer)
        pairs = ctx.data.extra.get("eval_pairs") or []
        precomputed = uses_precomputed_reference(ctx.recipe, ctx.recipe.kto)
        if pairs and hasattr(ctx.model, "disable_adapter") and not precomputed:
            from trl.trainer.utils import use_adapter

            from tunekit.evaluation.preference import dpo_accuracy

            ref = use_adapter(ctx.model, "ref" if "ref" in getattr(ctx.model, "peft_config", {}) else None)
            acc = dpo_accuracy(ctx.model, ctx.tokenizer, pairs, ctx.recipe.kto.beta, None, ctx.recipe.data.max_length,
                               reference_context=ref)
            console.print(f"held-out preference accuracy {acc['implicit_reward_accuracy']:.3f} "
                          f"(implicit reward, β = {ctx.recipe.kto.beta:g}; {acc['n']} pairs)")
            metrics.update({f"eval_{k}": v for k, v in acc.items() if not isinstance(v, list)})
        return metrics

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        if uses_precomputed_reference(ctx.recipe, ctx.recipe.kto):
            return {"reference": "precomputed log-probs of the start model"}
        if ctx.recipe.adapter.method in ZERO_START_METHODS:
            return {"reference": "the start model: the shared base with the adapters disabled"}
        return {"reference": "frozen copy of the initial adapter on the shared base"}


def run_kto(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy on unpaired (or split paired) feedback with KTO; returns the finished run."""
    return run_stage(KTOStage(), recipe, overwrite=overwrite, resume=resume)
