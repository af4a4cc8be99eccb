"""Supervised fine-tuning: next-token cross-entropy on assistant tokens.

loss = −(1/N) Σ_{t ∈ assistant} log p_θ(x_t | x_<t), N = number of assistant tokens in the batch.
Reads top to bottom: check output → data → model + adapter → Trainer → save → evaluate → samples → rename.
"""

from __future__ import annotations

import json
import time

from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.run.card import run_card
from tunekit.run.rundir import RunDir
from tunekit.stages import common


def run_sft(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Train, save and evaluate; returns the finished run directory and the trained model."""
    from transformers import PrinterCallback, Trainer, set_seed

    from tunekit.data.collate import SFTCollator
    from tunekit.data.pipeline import build_sft_data
    from tunekit.models.load import load_tokenizer

    # 1. Output: fail before any work if it exists (or an interrupted run is in the way).
    run = RunDir.prepare(common.output_of(recipe), overwrite=overwrite, resume=resume)
    set_seed(recipe.train.seed)
    # 2. Data first: a bad record fails in seconds, before the model loads. Nothing is written until 3 is done.
    tok = load_tokenizer(recipe.model)
    data = build_sft_data(recipe.data, tok, recipe.train.seed)
    console.print(data.stats.summary())
    # 3. Model and adapter.
    tok, model = common.load_trainable(recipe, tok)
    run.create()
    try:
        common.write_recipe(recipe, run)
        card = run_card("sft", recipe.train.seed, data.stats.fingerprint, {"data": data.stats.__dict__})
        run.write_json("run_card.json", card)
        # 4. Trainer.
        collator = SFTCollator(tok.pad_token_id, padding_free=recipe.data.packing)
        callbacks = common.standard_callbacks(run, collator)
        trainer = Trainer(
            model=model,
            args=common.training_arguments(recipe, run),
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=collator,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # our progress bar and metrics.jsonl replace its prints
        checkpoint = run.latest_checkpoint() if resume else None
        if resume:
            console.print(f"resuming from {checkpoint.name}" if checkpoint else "no checkpoint yet: starting over")
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - started
        # 5. Save the adapter (or model) before anything optional can fail.
        target = common.save_outputs(recipe, run, model, tok)
        # 6. Held-out loss and sample generations.
        metrics = dict(result.metrics)
        if data.eval is not None:
            ev = trainer.evaluate()
            metrics.update(ev)
            console.print(f"eval loss {ev['eval_loss']:.4f}")
        _write_samples(recipe, run, model, tok, data.eval_messages)
        card.update(
            finished=True,
            train_seconds=round(train_seconds, 2),
            train_loop_seconds=round(callbacks[-1].loop_seconds or 0.0, 3),
            train_loop_tokens=callbacks[-1].loop_tokens,
            global_step=trainer.state.global_step,
            metrics=metrics,
            padding_share=round(collator.padding_share, 4),
            output=target.name,
        )
        run.write_json("run_card.json", card)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; continue with --resume (work kept at {run.path})[/yellow]")
        raise
    final = run.finish()
    console.print(f"[green]done:[/green] {final}")
    return common.StageResult(final, model, tok, metrics)


def _write_samples(recipe: Recipe, run: RunDir, model, tok, eval_messages) -> None:
    from tunekit.evaluation.score import generate, split_prompt

    g = recipe.generate
    if g.samples == 0:
        return
    if g.prompts:
        prompts = [[{"role": "user", "content": p}] for p in g.prompts[: g.samples]]
        refs = [None] * len(prompts)
    else:
        pairs = [p for p in (split_prompt(m) for m in eval_messages) if p][: g.samples]
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    if not prompts:
        return
    answers = generate(model, tok, prompts, g.max_new_tokens)
    with (run.path / "samples.jsonl").open("w") as fh:
        for p, r, a in zip(prompts, refs, answers):
            fh.write(json.dumps({"prompt": p, "reference": r, "generation": a}, ensure_ascii=False) + "\n")
