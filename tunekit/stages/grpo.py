"""Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) on TRL 1.16's GRPOTrainer.

For each prompt x, G completions y_1..y_G are sampled; r_i = Σ_k w_k · reward_k(x, y_i) from the `rewards:`
list; A_i = (r_i − mean_j r_j) / std_j r_j (scale_rewards: group / batch / none), and the policy maximises the
clipped objective min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i) − β KL(π ‖ π_ref) over the completion tokens.
GSPO (Zheng et al., 2025) is `grpo.importance_sampling_level: sequence`: one ratio per completion,
s_i = (π(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(mean_t log ρ_t), clipped the same way (TRL's own switch).
Every `grpo.log_completions_steps` steps the latest prompts, completions and per-reward scores go to
completions.jsonl in the run directory, so reward hacking can be seen; warnings when the completion length or
one reward's share of the total runs away.

The reference (β > 0) is the start model, exactly: TRL's frozen copy of the initial adapter ("ref") for the PEFT
methods; for full fine-tuning, LoRA-XS and SVFT a frozen copy loaded by tunekit (`install_reference`), since TRL
would rebuild it from `config.name_or_path`, which misses a chained run's folded adapter.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import TrainerCallback

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.runner import Context, Stage, StageData, run_stage


def install_reference(trainer: Any, reference: Any, beta: float) -> None:
    """Give a trainer built with beta=0 (so TRL loads no reference of its own) our frozen `reference` and the
    real β, prepared as TRL prepares its own (no dropout, fused log-prob head, accelerator placement)."""
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    reference.requires_grad_(False)
    reference.eval()
    disable_dropout_in_model(reference)
    add_fused_lm_head(reference, temperature=trainer.temperature)
    if trainer.is_deepspeed_enabled:
        reference = prepare_deepspeed(reference, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        reference = prepare_fsdp(reference, trainer.accelerator)
    else:
        reference = trainer.accelerator.prepare_model(reference, evaluation_mode=True)
    trainer.ref_model = reference
    trainer.beta = beta


def _prompt_rows(split: Any) -> tuple[list, list, dict[str, Any], str]:
    """Rows {prompt, every column any record has (None where a record lacks it)}, for the rewards."""
    import json

    columns = sorted({k for rec in split.train + split.eval for k in rec.columns})

    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "bool"
        return "number" if isinstance(value, int | float) else type(value).__name__

    # A column mixing kinds (numbers and strings, a list among strings) is valid JSON Lines but not one Arrow
    # column: its values go to the rewards as text (json for lists and mappings), and the summary says so.
    as_text = sorted(c for c in columns if len({kind(r.columns[c]) for r in split.train + split.eval
                                                 if r.columns.get(c) is not None}) > 1)

    def cell(c: str, value: Any) -> Any:
        if c not in as_text or value is None or isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)

    def rows(records: list[Any]) -> list[dict[str, Any]]:
        return [{"prompt": r.prompt, **{c: cell(c, r.columns.get(c)) for c in columns}} for r in records]

    note = f"; columns for the rewards: {', '.join(columns)}" if columns else ""
    if as_text:
        note += f" ({', '.join(as_text)}: mixed numbers/strings/lists, passed to the rewards as text)"
    return rows(split.train), rows(split.eval), {"columns": columns}, note


class PromptStage(Stage):
    """Data step of the RL stages (grpo, ppo): prompts plus every other column, for the rewards."""

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from tunekit.data.preference import to_prompt

        return common.record_data(recipe, to_prompt, "prompt", "prompts", _prompt_rows,
                                  lambda r: r.columns.get("answer", r.columns.get("reference")))


class CompletionsCallback(TrainerCallback):
    """Every N steps: the latest generation batch (prompt, completion, each reward, advantage) to
    completions.jsonl; the run-away watch gets the step's mean completion length and reward means."""

    def __init__(self, path: Any, every: int, watch: Any = None, weights: dict[str, float] | None = None):
        self.path, self.every, self.watch, self.weights = path, every, watch, weights
        self.trainer: Any = None  # set once the trainer exists (its `_logs` hold the latest batch)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.watch is not None and logs:
            for warning in self.watch.update_from_logs(logs, self.weights, state.global_step):
                from tunekit.console import console

                console.print(f"[yellow]warning: {warning}[/yellow]")

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every or self.trainer is None:
            return
        if not state.is_world_process_zero:
            return
        logs = self.trainer._logs
        rewards = {name: list(v) for name, v in logs["rewards"].items()}
        with self.path.open("a") as fh:
            for i, (p, c) in enumerate(zip(list(logs["prompt"]), list(logs["completion"]))):
                row = {"step": state.global_step, "prompt": p, "completion": c,
                       "rewards": {k: v[i] for k, v in rewards.items() if i < len(v)},
                       "advantage": list(logs["advantages"])[i] if i < len(logs["advantages"]) else None}
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


class GRPOStage(PromptStage):
    name = "grpo"

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        """Prompts, checked against the columns the rewards read (before the model loads)."""
        from tunekit.rewards import RewardSet

        data = super().load_data(recipe, tok)
        self.rewards = RewardSet.from_specs(recipe.rewards)  # built once; the trainer reuses it
        self.rewards.check_columns(data.counts["columns"])
        return data

    def build_trainer(self, ctx: Context) -> Any:
        from trl import GRPOConfig, GRPOTrainer

        from tunekit.generation import _vllm_usable
        from tunekit.rewards import RewardTracker

        r, g = ctx.recipe, ctx.recipe.grpo
        own_reference = g.beta > 0 and r.adapter.method not in common.PEFT_METHODS
        rewards = self.rewards
        funcs, weights = rewards.funcs, rewards.weights
        args = common.training_arguments(
            r, ctx.run, GRPOConfig,
            num_generations=g.num_generations,
            max_completion_length=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            beta=0.0 if own_reference else g.beta,
            epsilon=g.epsilon,
            num_iterations=g.num_iterations,
            loss_type=g.loss_type,
            scale_rewards=g.scale_rewards,
            importance_sampling_level=g.importance_sampling_level,
            mask_truncated_completions=g.mask_truncated_completions,
            reward_weights=weights,
            use_vllm=_vllm_usable() if g.use_vllm is None else g.use_vllm,
            log_completions=False,
            disable_dropout=True,
        )
        watch = RewardTracker(max_completion_length=g.max_completion_length)
        completions = CompletionsCallback(ctx.run.path / "completions.jsonl", g.log_completions_steps, watch,
                                          dict(zip(rewards.names, weights)))
        trainer = self.trl_trainer(ctx, GRPOTrainer, args, completions, reward_funcs=funcs)
        if own_reference:
            from tunekit.models.load import load_model

            install_reference(trainer, load_model(common.base_model_config(r), ctx.tokenizer), g.beta)
        completions.trainer = trainer
        return trainer


def run_grpo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy with GRPO on prompts and the recipe's rewards; returns the finished run."""
    return run_stage(GRPOStage(), recipe, overwrite=overwrite, resume=resume)
