"""RLHF with PPO (InstructGPT's stage 3, Ouyang et al. 2022): maximise E[r(x, y)] − β·KL(π ‖ π_ref) over
prompts x and sampled responses y, with the clipped PPO objective (Schulman et al. 2017) and GAE advantages.

Rewards are the recipe's `rewards:` (a `tunekit rm` run is `{name: reward_model, path: RUN}`; verifiable rewards
from the registry work alone or beside it). The policy is the recipe's model + adapter (`model.name` may be an
sft run); the reference is the same model with its adapter off (a frozen copy for full fine-tuning, PiSSA and
MiLoRA); the value function is a head on the policy's backbone or a separate model (`ppo.value_model`).
The PPO loop itself is tunekit.ppo.trainer; this module puts it on the shared stage runner: run directory,
progress, metrics.jsonl, rollouts.jsonl, checkpoints and `--resume`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.errors import TunekitError
from tunekit.stages import common
from tunekit.stages.grpo import PromptStage
from tunekit.stages.runner import Context, run_stage


def _reward_fn(recipe: Recipe, columns: list[str]):
    """reward(prompts, completions, records, completion_ids) = Σ_k w_k r_k over `rewards:`; the last call's
    per-reward means are kept on the function (`.last_means`) for the metrics."""
    from tunekit.rewards import RewardSet

    rewards = RewardSet.from_specs(recipe.rewards)

    def reward(prompts, completions, records, completion_ids):
        cols = {c: [r.get(c) for r in records] for c in columns}
        out = rewards.score(prompts, completions, cols, completion_ids)
        reward.last_means = {k: v for k, v in out.means().items() if k != "reward"}
        return out.total

    reward.last_means = {}
    return reward


def _value_model(recipe: Recipe, tok: Any, policy: Any, load_start: Any):
    """`separate` value model: (backbone, ValueHead) started from `ppo.value_model_name` (a reward model's score
    head seeds the head), else from the policy's base; trained in full."""
    import torch

    from tunekit.ppo.models import ValueHead, hidden_size_of

    name = recipe.ppo.value_model_name
    score_weight = None
    if name is None:
        backbone = load_start().get_decoder()
    else:
        from tunekit.rewards.reward_model import load_reward_model

        rm, rm_tok = load_reward_model(name)
        if rm_tok.get_vocab() != tok.get_vocab():
            raise TunekitError(f"ppo.value_model_name: '{name}' uses another tokenizer than the policy; a value "
                               "model reads the policy's tokens (use a reward model trained from the same base)")
        if hasattr(rm, "merge_and_unload"):
            rm = rm.merge_and_unload()
        backbone = getattr(rm, rm.base_model_prefix)
        head = getattr(rm, "score", None)
        score_weight = None if head is None else head.weight.detach()
    backbone.requires_grad_(True)
    backbone.train()
    value_head = ValueHead(hidden_size_of(backbone))
    if score_weight is not None and score_weight.shape == value_head.summary.weight.shape:
        with torch.no_grad():
            value_head.summary.weight.copy_(score_weight.to(value_head.summary.weight.dtype))
    device = next(policy.parameters()).device
    return backbone.to(device), value_head.to(device)


class PPORun:
    """The PPO loop in the shape the stage runner drives (train / evaluate / state), with our progress bar,
    metrics.jsonl, rollouts.jsonl and checkpoints."""

    def __init__(self, ctx: Context, trainer: Any, reward_fn: Any):
        self.ctx, self.trainer, self.reward_fn = ctx, trainer, reward_fn
        self.state = SimpleNamespace(global_step=0)
        self.metrics_path = ctx.run.path / "metrics.jsonl"
        self.eval_start: float | None = None

    def remove_callback(self, callback: Any) -> None:  # the runner removes transformers' printer; we have none
        return None

    # ---- held-out reward: greedy responses to the eval prompts, scored by the same rewards
    def held_out_reward(self) -> float | None:
        from tunekit.generation import sample

        records = self.ctx.data.extra.get("eval_rows") or []
        if not records:
            return None
        p = self.ctx.recipe.ppo
        prompts = [r["prompt"] for r in records]
        out = sample(self.trainer.unwrapped.policy, self.ctx.tokenizer, prompts, max_new_tokens=p.max_new_tokens,
                     temperature=0, batch_size=p.generation_batch_size)
        ids = [row[m.bool()].tolist() for row, m in zip(out.response_ids, out.response_mask)]
        scores = [float(s) for s in self.reward_fn(prompts, out.texts, records, ids)]
        with (self.ctx.run.path / "eval_answers.jsonl").open("a") as fh:  # so a reward hack can be read, not guessed
            for record, text, score in zip(records, out.texts, scores):
                fh.write(json.dumps({"step": self.trainer.step_count, **record, "response": text, "reward": score},
                                    ensure_ascii=False) + "\n")
        return sum(scores) / len(scores)

    def _log(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _write_rollouts(self, step: int) -> None:
        every = self.ctx.recipe.ppo.samples_every
        exp = getattr(self.trainer, "last_experience", None)
        if not every or step % every or exp is None:
            return
        with (self.ctx.run.path / "rollouts.jsonl").open("a") as fh:
            for prompt, text, score, done in zip(exp.prompts, exp.texts, exp.raw_scores.tolist(),
                                                 exp.finished.tolist()):
                fh.write(json.dumps({"step": step, "prompt": prompt, "response": text, "reward": score,
                                     "finished": done}, ensure_ascii=False) + "\n")

    def _checkpoint(self, step: int) -> None:
        t = self.ctx.recipe.train
        if not t.save_steps or step % t.save_steps or step == self.trainer.steps:
            return
        self.trainer.save_checkpoint(self.ctx.run.checkpoints / f"checkpoint-{step}")
        kept = sorted(self.ctx.run.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        for old in kept[: -t.save_total_limit] if t.save_total_limit else []:
            shutil.rmtree(old, ignore_errors=True)

    def _drop_rows_after(self, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint: they are redone, so drop them."""
        for path in (self.metrics_path, self.ctx.run.path / "rollouts.jsonl", self.ctx.run.path / "eval_answers.jsonl"):
            if path.is_file():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows
                                        if r.get("step", 0) <= step))

    def train(self, resume_from_checkpoint: str | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        tr = self.trainer
        if resume_from_checkpoint:
            tr.load_checkpoint(Path(resume_from_checkpoint))
            self._drop_rows_after(tr.step_count)
        elif self.ctx.resume:  # resumed before the first checkpoint: start over
            self._drop_rows_after(-1)
        if tr.step_count == 0:
            self.eval_start = self.held_out_reward()
            if self.eval_start is not None:
                self._log({"step": 0, "eval_reward": self.eval_start})
                console.print(f"held-out reward before PPO: {self.eval_start:.4f}")
        progress = Progress(TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
        task = progress.add_task("ppo", total=tr.steps, completed=tr.step_count, info="")
        logging_steps = self.ctx.recipe.train.logging_steps
        totals = {"rollout_seconds": 0.0, "update_seconds": 0.0, "steps": 0}

        def on_step(row: dict[str, Any]) -> None:
            step = row["step"]
            row["loss"] = row.get("policy_loss", 0.0) + self.ctx.recipe.ppo.vf_coef * row.get("value_loss", 0.0)
            row.update(self.reward_fn.last_means)
            for key in ("rollout_seconds", "update_seconds"):
                totals[key] += row[key]
            totals["steps"] += 1
            if step % logging_steps == 0 or step == tr.steps:
                self._log(row)
            self._write_rollouts(step)
            self.state.global_step = step
            progress.update(task, completed=step,
                            info=f"reward {row['reward']:.3f}  kl {row['kl']:.3f}  len {row['response_length']:.1f}")

        with progress:
            rows = tr.train(on_step=on_step, checkpoint=self._checkpoint)
        self.state.global_step = tr.step_count
        metrics: dict[str, Any] = {"global_step": tr.step_count, "kl_coef": tr.kl_ctl.value,
                                   "rollout_seconds": round(totals["rollout_seconds"], 2),
                                   "update_seconds": round(totals["update_seconds"], 2)}
        if rows:
            last = rows[-1]
            metrics.update({f"train_{k}": last[k] for k in ("reward", "kl", "response_length")})
        if self.eval_start is not None:
            metrics["eval_reward_start"] = self.eval_start
        return SimpleNamespace(metrics=metrics)

    def evaluate(self) -> dict[str, Any]:
        reward = self.held_out_reward()
        if reward is None:
            return {}
        self._log({"step": self.trainer.step_count, "eval_reward": reward})
        start = f" (from {self.eval_start:.4f})" if self.eval_start is not None else ""
        console.print(f"held-out reward {reward:.4f}{start}")
        return {"eval_reward": reward}


class PPOStage(PromptStage):
    """The policy loads as every stage's model does: an sft run in `model.name` is folded into its base in memory
    (tunekit.models.load), so PPO starts from, and is anchored to, that model."""

    name = "ppo"

    def load_data(self, recipe: Recipe, tok: Any):
        from tunekit.rewards import RewardSet

        data = super().load_data(recipe, tok)
        RewardSet.from_specs(recipe.rewards).check_columns(data.counts["columns"])  # before the model loads
        data.extra["eval_rows"] = list(data.eval) if data.eval is not None else []
        return data

    def build_trainer(self, ctx: Context) -> PPORun:
        from functools import partial

        from tunekit.models.load import load_model
        from tunekit.ppo.models import PolicyValue, Reference, ValueHead, disable_dropout, hidden_size_of
        from tunekit.ppo.trainer import PPOTrainer

        r, p = ctx.recipe, ctx.recipe.ppo
        start = partial(load_model, r.model, ctx.tokenizer)  # the starting policy, without the PPO adapter
        policy = ctx.model
        disable_dropout(policy)
        if p.value_model == "separate":  # trained in full: `auto` keeps it fp32 on a CPU
            backbone, head = _value_model(r, ctx.tokenizer, policy, start)
            model = PolicyValue(policy, head, backbone)
        else:
            device = next(policy.parameters()).device
            model = PolicyValue(policy, ValueHead(hidden_size_of(policy)).to(device))
        frozen_copy = partial(load_model, common.base_model_config(r), ctx.tokenizer)
        reference = Reference.for_policy(policy, r.adapter.method, load_base=frozen_copy)  # in the policy's dtype
        columns = ctx.data.counts.get("columns", [])
        reward_fn = _reward_fn(r, columns)
        records = list(ctx.data.train)
        self._model = model
        trainer = PPOTrainer(
            model, reference, ctx.tokenizer, records, reward_fn, p,
            steps=r.train.max_steps, lr=r.train.lr, seed=r.train.seed, max_grad_norm=r.train.max_grad_norm,
            forward_batch=r.train.batch_size, weight_decay=r.train.weight_decay, lr_scheduler=r.train.lr_scheduler,
            warmup_ratio=r.train.warmup_ratio,
        )
        return PPORun(ctx, trainer, reward_fn)

    def save(self, ctx: Context, trainer: Any) -> Any:
        """The policy (adapter or model) as every stage saves it, and the value head beside it."""
        from safetensors.torch import save_file

        target = common.save_outputs(ctx.recipe, ctx.run, ctx.model, ctx.tokenizer)
        head = {k: v.detach().contiguous().cpu() for k, v in self._model.value_head.state_dict().items()}
        save_file(head, str(ctx.run.path / "value_head.safetensors"))
        if self._model.value_model is not None:
            self._model.value_model.save_pretrained(ctx.run.path / "value_model", safe_serialization=True)
        return target

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        p = ctx.recipe.ppo
        return {"ppo": {"value_model": p.value_model, "reference": trainer.trainer.reference.kind,
                        "final_kl_coef": trainer.trainer.kl_ctl.value}}


def run_ppo(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train a policy with PPO against the recipe's rewards; returns the finished run."""
    return run_stage(PPOStage(), recipe, overwrite=overwrite, resume=resume)
