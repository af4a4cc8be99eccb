"""The one road every training stage takes (sft, rm, dpo, grpo, ppo, cai's sub-runs).

    prepare output → tokenizer → data → model + adapter → create run → recipe + card → trainer → train
    → save adapter/model → evaluate → samples → card → rename `.partial` into place

A stage is a `Stage` subclass that supplies only what differs: its data, its model head, its trainer and its
metrics. Everything a user relies on — output checks before any work, one-line errors, `--resume` from the last
checkpoint, the progress bar, metrics.jsonl + loss.png, the run card, samples — lives here once, so a new
stage inherits it. Optional steps after the save (evaluation, samples) cannot lose the trained adapter: a
failure there is a warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.launch import ranks
from tunekit.run.card import run_card
from tunekit.run.rundir import RunDir
from tunekit.stages import common
from tunekit.stages.common import StageData, StageResult

__all__ = ["Context", "Stage", "StageData", "StageResult", "check_inputs", "run_stage"]

_INPUTS_ONLY: ContextVar[bool] = ContextVar("tunekit_inputs_only", default=False)


class _InputsChecked(Exception):
    """run_stage stopped after its input checks (inside `check_inputs`)."""


@dataclass
class Context:
    """A run in progress, as the stage hooks see it."""

    recipe: Recipe
    run: RunDir
    tokenizer: Any
    model: Any
    data: StageData
    resume: bool
    collator: Any = None  # counts real/padded tokens for tokens/s, when the stage has one
    callbacks: list[Any] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Hooks of one stage. Override `load_data` and `build_trainer`; the rest has working defaults."""

    name = "stage"

    def load_tokenizer(self, recipe: Recipe) -> Any:
        from tunekit.models.load import load_tokenizer

        return load_tokenizer(recipe.model)

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        raise NotImplementedError

    def load_model(self, recipe: Recipe, tok: Any) -> tuple[Any, Any]:
        """(tokenizer, trainable model): the causal LM with the recipe's adapter attached."""
        return common.load_trainable(recipe, tok)

    def build_trainer(self, ctx: Context) -> Any:
        """A transformers/TRL Trainer over ctx.model and ctx.data, with ctx.callbacks attached."""
        raise NotImplementedError

    def trl_trainer(self, ctx: Context, trainer_class: Any, args: Any, *callbacks: Any, **kwargs: Any) -> Any:
        """A TRL trainer over the run: `trainer_class(model=, args=, train_dataset=, eval_dataset=,
        processing_class=, callbacks=, **kwargs)`. The callbacks are the standard ones (progress, metrics.jsonl,
        finite-loss guard) plus `callbacks`, kept in ctx.callbacks; TRL tokenizes with the run's tokenizer."""
        ctx.callbacks = [*common.standard_callbacks(ctx.run, ctx.collator), *callbacks]
        return trainer_class(
            model=ctx.model,
            args=args,
            train_dataset=ctx.data.train,
            eval_dataset=ctx.data.eval,
            processing_class=ctx.tokenizer,
            callbacks=ctx.callbacks,
            **kwargs,
        )

    def evaluate(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        """Held-out metrics after training (default: the trainer's own evaluate on the eval split)."""
        if ctx.data.eval is None:
            return {}
        metrics = trainer.evaluate()
        if "eval_loss" in metrics:
            console.print(f"eval loss {metrics['eval_loss']:.4f}")
        return metrics

    def write_samples(self, ctx: Context) -> None:
        """Greedy generations for held-out prompts (or `generate.prompts`) into samples.jsonl."""
        common.write_samples(ctx.recipe, ctx.run, ctx.model, ctx.tokenizer, ctx.data)

    def save(self, ctx: Context, trainer: Any) -> Any:
        return common.save_outputs(ctx.recipe, ctx.run, ctx.model, ctx.tokenizer)

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        """Stage-specific entries for the finished run card."""
        return {}


def run_stage(stage: Stage, recipe: Recipe, overwrite: bool = False, resume: bool = False) -> StageResult:
    """Train, save and evaluate `recipe` with `stage`; returns the finished run directory and the model."""
    from transformers import PrinterCallback, set_seed

    # 1. Output: fail before any work if it exists (or an interrupted run is in the way).
    #    The output guard checks and locks it; with --resume the recipe must match the interrupted run's.
    run = common.prepare_run(recipe, overwrite=overwrite, resume=resume)
    set_seed(recipe.train.seed)
    try:
        # 2. Data first: a bad record fails in seconds, before the model loads. Nothing is written until 3 is done.
        tok = stage.load_tokenizer(recipe)
        data = stage.load_data(recipe, tok)
        if resume:
            _check_same_data(run, data.fingerprint)
        if _INPUTS_ONLY.get():
            raise _InputsChecked
        console.print(data.summary)
        # 3. Model and adapter, after the memory plan's estimate for this GPU (none on CPU).
        _print_memory_estimate(recipe, stage.name)
        tok, model = stage.load_model(recipe, tok)
    except BaseException:
        run.release()
        raise
    run.create()
    ctx = Context(recipe, run, tok, model, data, resume)
    try:
        common.write_recipe(recipe, run)
        ctx.card = run_card(stage.name, recipe.train.seed, data.fingerprint, {"data": data.counts})
        chain = getattr(model, "tunekit_chain", None)
        if chain:
            ctx.card["chained_from"] = chain
        run.write_json("run_card.json", ctx.card)
        # 4. Trainer, with our progress bar and metrics.jsonl in place of its prints.
        trainer = stage.build_trainer(ctx)
        trainer.remove_callback(PrinterCallback)
        checkpoint = run.latest_checkpoint() if resume else None
        if resume:
            console.print(f"resuming from {checkpoint.name}" if checkpoint else "no checkpoint yet: starting over")
        _no_step_past_the_end(trainer)
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - started
        # 5. Save the adapter (or model) before anything optional can fail.
        target = stage.save(ctx, trainer)
        metrics = dict(result.metrics)
        # 6. Held-out metrics and sample generations: a failure here keeps the trained adapter.
        steps = [("evaluation", stage.evaluate), ("sample generation", stage.write_samples)]
        if not ranks.is_main() or ranks.zero3_partitioned(model):  # rank 0 writes; ZeRO-3 generation needs all
            steps = steps[:1]
        for what, step in steps:
            try:
                # (`step is stage.evaluate` never held: each attribute access makes a new bound method)
                out = step(ctx, trainer) if what == "evaluation" else step(ctx)
            except Exception as exc:  # noqa: BLE001 - optional step; the adapter is already saved
                console.print(f"[yellow]warning: {what} failed ({type(exc).__name__}: {exc}); "
                              f"the trained {target.name}/ is kept[/yellow]")
                ctx.card.setdefault("warnings", []).append(f"{what} failed: {type(exc).__name__}: {exc}")
                continue
            if isinstance(out, dict):
                metrics.update(out)
        metrics_cb = next((c for c in ctx.callbacks if hasattr(c, "loop_seconds")), None)
        ctx.card.update(
            world_size=ranks.world_size(),
            finished=True,
            train_seconds=round(train_seconds, 2),
            train_loop_seconds=round(getattr(metrics_cb, "loop_seconds", None) or 0.0, 3),
            train_loop_tokens=getattr(metrics_cb, "loop_tokens", 0),
            global_step=trainer.state.global_step,
            metrics=metrics,
            output=target.name,
            **stage.finish_card(ctx, trainer),
        )
        run.write_json("run_card.json", ctx.card)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; continue with --resume (work kept at {run.path})[/yellow]")
        run.release()
        raise
    except BaseException:
        run.fail()  # keeps a resumable .partial (with a checkpoint), removes one that has none
        raise
    final = run.finish()
    console.print(f"[green]done:[/green] {final}")
    return StageResult(final, model, tok, metrics)


def check_inputs(run: Callable[..., Any], recipe: Recipe, overwrite: bool = False, resume: bool = False) -> None:
    """Every check a stage's run function (`run_sft`, `run_grpo`, ...) makes before its model loads: the output
    guard (its lock taken and released again), the recipe and data against an interrupted run's with --resume,
    the tokenizer and every data record. Nothing is loaded beyond that and nothing is written. The launcher
    (`--gpus N`) runs it in its own process before it starts any worker, so bad input is one error line, not
    one per worker followed by the distributed launcher's report."""
    token = _INPUTS_ONLY.set(True)
    try:
        run(recipe, overwrite=overwrite, resume=resume)
    except _InputsChecked:
        return
    finally:
        _INPUTS_ONLY.reset(token)
    raise RuntimeError(f"{getattr(run, '__name__', run)} does not go through run_stage: its inputs were not checked")


def _no_step_past_the_end(trainer: Any) -> None:
    """Resuming from a checkpoint of the last step (a run killed after its final checkpoint, before it finished),
    transformers' epoch loop would still train one step (max_steps + 1): it enters the unfinished epoch and checks
    max_steps only after a step. Here an epoch starts only while steps are left, so such a resume loads the
    checkpoint and goes straight to the summary, the save and the evaluation. The summary's train_loss is then
    the mean of the losses the interrupted run logged (the trainer would report 0 for no step)."""
    run_epoch = getattr(trainer, "_run_epoch", None)  # transformers' Trainer (5.x); PPO has its own loop
    if run_epoch is None or not hasattr(trainer, "state"):
        return

    def run_epoch_while_steps_are_left(*args: Any, **kwargs: Any) -> Any:
        state = trainer.state
        if 0 < state.max_steps <= state.global_step:
            if ranks.is_main():
                console.print(f"nothing left to train: step {state.global_step} of {state.max_steps} is done")
            losses = [row["loss"] for row in state.log_history if isinstance(row.get("loss"), int | float)]
            if losses:
                trainer._total_loss_scalar = sum(losses) / len(losses) * state.global_step
            trainer.control.should_training_stop = True
            return None
        return run_epoch(*args, **kwargs)

    trainer._run_epoch = run_epoch_while_steps_are_left


def _check_same_data(run: RunDir, fingerprint: str) -> None:
    """--resume continues the same run: the same recipe (check_resume) and the same data. A data file replaced
    under the same name changes the fingerprint of the records read; the interrupted run's card holds the old one."""
    import json

    from tunekit.errors import TunekitError

    card = run.path / "run_card.json"
    try:
        before = json.loads(card.read_text(encoding="utf-8")).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        return  # no card yet (killed before it was written): nothing to compare with
    if before and fingerprint and before != fingerprint:
        raise TunekitError(f"--resume: the training data changed since the interrupted run at '{run.path}' (data "
                           f"fingerprint {before[:12]} -> {fingerprint[:12]}): restore the data, or start over "
                           "with --overwrite")


def _print_memory_estimate(recipe: Recipe, stage: str) -> None:
    """`tunekit plan`'s per-GPU peak for this run, with a warning when it exceeds the device's free memory."""
    from tunekit.launch.plan import startup_estimate

    try:
        found = startup_estimate(recipe, stage)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        console.print(f"[yellow]warning: no memory estimate ({type(exc).__name__}: {exc})[/yellow]")
        return
    if found is None:
        return
    line, exceeds = found
    console.print(f"memory plan: {line}")
    if exceeds:
        console.print("[yellow]warning: the estimated peak exceeds this GPU's free memory; see `tunekit plan` "
                      "for a configuration that fits[/yellow]")
