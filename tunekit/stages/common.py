"""What every training stage shares: output checks, dry runs, model+adapter loading, Trainer arguments,
and writing the finished run directory. A new stage (dpo, grpo, ppo, ...) is its data + trainer over these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.adapters import AttachContext, attach, count_trainable, save_adapter
from tunekit.config.load import dump_recipe
from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.models.load import (
    build_meta_model,
    device_type,
    load_model,
    load_tokenizer,
    resolve_dtype,
    with_resolved_dtype,
)
from tunekit.run.callbacks import FiniteGuardCallback, MetricsCallback, ProgressCallback
from tunekit.run.plot import plot_loss
from tunekit.run.rundir import RunDir, check_resume, default_output

#: adapter methods whose model TRL sees as a PEFT model: a reference can be TRL's frozen copy of the initial
#: adapter ("ref") on the shared base
PEFT_METHODS = ("lora", "dora", "pissa", "milora")
#: of those, the ones whose fresh adapter adds exactly zero (B = 0) to an unchanged base: with the adapters
#: disabled the model IS the start model (a chained run's fold included), so no "ref" copy is needed
ZERO_START_METHODS = ("lora", "dora")


def uses_precomputed_reference(recipe: Recipe, section: Any) -> bool:
    """dpo / kto (`section`: recipe.dpo / recipe.kto): the reference log-probs are computed once before training
    when the section asks for it, or when the model is no PEFT model (LoRA-XS, SVFT, full fine-tuning: no adapter
    to disable or copy)."""
    return section.precompute_ref_log_probs or recipe.adapter.method not in PEFT_METHODS


@dataclass
class StageData:
    """What a stage's data step hands to its trainer: datasets, counts for the log/card, prompts for samples."""

    train: Any
    eval: Any | None
    fingerprint: str
    summary: str
    counts: dict[str, Any] = field(default_factory=dict)
    sample_prompts: list[Any] = field(default_factory=list)  # message lists for samples.jsonl
    sample_references: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific (e.g. eval messages)


@dataclass
class StageResult:
    """A finished stage: its run directory, and the trained model and tokenizer still in memory."""

    path: Path
    model: Any
    tokenizer: Any
    metrics: dict[str, Any]


def output_of(recipe: Recipe) -> Path:
    return Path(recipe.output) if recipe.output else default_output(recipe.stage)


def recipe_inputs(recipe: Recipe) -> list[str]:
    """The local files a recipe reads (model folder, data, chat template): an output may not overlap them."""
    found: list[str] = [recipe.model.name]
    if recipe.model.chat_template and recipe.model.chat_template.endswith(".jinja"):
        found.append(recipe.model.chat_template)
    for split in (recipe.data.train, recipe.data.eval):
        if isinstance(split, str):
            found.append(split)
        elif split:
            found.extend(s.path for s in split)
    return found


def prepare_run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> RunDir:
    """The output guard for a training stage, before any work: checked, locked, and with --resume the recipe
    compared with the interrupted run's (nothing of it is touched when they differ)."""
    run = RunDir.prepare(output_of(recipe), overwrite=overwrite, resume=resume, inputs=recipe_inputs(recipe))
    if resume:
        try:
            check_resume(recipe, run)
        except BaseException:
            run.release()
            raise
    return run


def dry_run(recipe: Recipe) -> int:
    """Resolve the recipe, build its rewards (an unknown name, a `python:` reward that does not import, a bad
    parameter fail as in the real run; a reward model is not loaded) and count trainable parameters on the meta
    device (config.json only, no weights)."""
    if recipe.rewards:
        from tunekit.rewards import RewardSet

        RewardSet.from_specs(recipe.rewards)
    task = "seq_cls" if recipe.stage == "rm" else "causal_lm"
    model = build_meta_model(recipe.model, task=task)
    ctx = AttachContext(quantized=recipe.model.load_in_4bit or recipe.model.load_in_8bit, meta=True, task=task)
    model = attach(model, recipe.adapter, ctx)
    trainable, total = count_trainable(model)
    print(dump_recipe(recipe), end="")
    print(f"total parameters: {total}")
    print(f"trainable parameters: {trainable}")
    return trainable


def base_model_config(recipe: Recipe, task: str = "causal_lm"):
    """`recipe.model` with the dtype the trained model's base loads in (`resolve_dtype`): a causal LM under an
    adapter keeps its base frozen; a reward model's score head, and full fine-tuning, train in full."""
    return with_resolved_dtype(recipe.model, frozen=recipe.adapter.method != "none" and task == "causal_lm")


def load_trainable(recipe: Recipe, tok: Any = None, task: str = "causal_lm"):
    """(tokenizer, model ready to train). Tokens added by the chat template get trainable embedding rows."""
    tok = tok if tok is not None else load_tokenizer(recipe.model)
    model_cfg = base_model_config(recipe, task)
    model = load_model(model_cfg, tok, task=task)
    new_ids = getattr(model, "tunekit_new_token_ids", [])
    ctx = AttachContext(
        quantized=recipe.model.load_in_4bit or recipe.model.load_in_8bit,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        new_token_ids=new_ids,
        task=task,
    )
    model = attach(model, recipe.adapter, ctx)
    trainable, total = count_trainable(model)
    console.print(f"model: {recipe.model.name} ({total:,} parameters; {trainable:,} trainable, "
                  f"{100 * trainable / max(total, 1):.2f}%) dtype {resolve_dtype(model_cfg)} on {device_type()}")
    return tok, model


def training_arguments(recipe: Recipe, run: RunDir, config_class: Any = None, **overrides: Any):
    """transformers TrainingArguments (or a TRL config class built on it) from the recipe's `train` section.

    TRL's configs default `bf16` and `gradient_checkpointing` to True; both are always set from the recipe here.
    """
    import torch
    from transformers import TrainingArguments

    config_class = config_class or TrainingArguments

    t = recipe.train
    cuda = device_type() == "cuda"
    bf16 = cuda and resolve_dtype(recipe.model) == torch.bfloat16
    kwargs: dict[str, Any] = dict(
        output_dir=str(run.checkpoints),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        optim=t.optim,
        report_to=t.report_to or "none",
        bf16=bf16,
        use_cpu=not cuda and device_type() != "mps",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
    )
    from tunekit.launch.accelerate import trainer_overrides

    kwargs.update(trainer_overrides())  # DeepSpeed JSON when launched with --strategy zero*
    kwargs.update(overrides)
    if "tensorboard" in t.report_to:  # transformers 5 reads the log folder from this variable only
        import os

        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tensorboard")
    return config_class(**kwargs)


def record_data(recipe: Recipe, convert: Any, unit: str, key: str, to_rows: Any, reference: Any) -> Any:
    """Data step of the stages that train on records (rm, dpo: preference pairs; grpo, ppo: prompts): read and
    split with `convert` (tunekit.data.preference), then datasets, fingerprint, summary, counts, sample prompts.

    to_rows(split) -> (train rows, eval rows, extra counts, summary note); reference(record) -> its sample
    reference. The summary counts `unit`s; counts and `extra` are keyed `train_<key>` / `eval_<key>`.
    """
    from datasets import Dataset

    from tunekit.data.preference import fingerprint_rows, split_records
    from tunekit.errors import TunekitError

    split = split_records(recipe.data, recipe.train.seed, convert)
    if not split.train:
        raise TunekitError(f"no {unit} left for training (data.max_samples or weights too small)")
    train_rows, eval_rows, more, note = to_rows(split)
    src = ", ".join(f"{s['path']} x{s['weight']:g} -> {s['used']}" for s in split.sources)
    return StageData(
        Dataset.from_list(train_rows),
        Dataset.from_list(eval_rows) if eval_rows else None,
        fingerprint_rows(train_rows, eval_rows),
        f"data: {len(train_rows)} train / {len(eval_rows)} eval {unit}s ({src}){note}",
        {f"train_{key}": len(train_rows), f"eval_{key}": len(eval_rows), **more, "sources": split.sources},
        sample_prompts=[r.prompt for r in split.eval],
        sample_references=[reference(r) for r in split.eval],
        extra={f"eval_{key}": split.eval},
    )


def standard_callbacks(run: RunDir, collator: Any) -> list:
    return [
        FiniteGuardCallback(run.path),
        ProgressCallback(collator),
        MetricsCallback(run.path / "metrics.jsonl", collator),
    ]


def save_outputs(recipe: Recipe, run: RunDir, model: Any, tok: Any) -> Path:
    """Final adapter (PEFT layout) or full model, with the tokenizer beside it; loss plot."""
    from tunekit.launch import ranks

    target = run.path / ("model" if recipe.adapter.method == "none" else "adapter")
    with ranks.gathered_for_save(model, full=recipe.adapter.method == "none"):  # ZeRO-3: every rank gathers
        if ranks.is_main():
            save_adapter(model, recipe.adapter, target)
            tok.save_pretrained(target)
            if recipe.adapter.method == "none":  # a full model folder: servers stop at its end-of-turn token
                from tunekit.chat.serving import write_generation_config

                write_generation_config(target, tok)
            plot_loss(run.path / "metrics.jsonl", run.path / "loss.png")
    return target


def write_recipe(recipe: Recipe, run: RunDir) -> None:
    run.write_text("recipe.yaml", dump_recipe(recipe))


def held_out_prompts(conversations: list[list[dict[str, str]]]) -> tuple[list, list]:
    """(prompt turns, reference answer) of each held-out conversation that ends in an assistant turn."""
    from tunekit.evaluation.score import split_prompt

    pairs = [p for p in (split_prompt(m) for m in conversations) if p]
    return [p for p, _ in pairs], [r for _, r in pairs]


def write_samples(recipe: Recipe, run: RunDir, model: Any, tok: Any, data: Any) -> None:
    """Greedy generations for `generate.prompts` (else the stage's held-out prompts) into samples.jsonl."""
    import json

    from tunekit.generation import sample

    g = recipe.generate
    if g.samples == 0:
        return
    if g.prompts:
        prompts: list[Any] = [[{"role": "user", "content": p}] for p in g.prompts[: g.samples]]
        refs: list[Any] = [None] * len(prompts)
    else:
        prompts, refs = list(data.sample_prompts[: g.samples]), list(data.sample_references[: g.samples])
        refs += [None] * (len(prompts) - len(refs))
    if not prompts:
        return
    answers = sample(model, tok, prompts, max_new_tokens=g.max_new_tokens, temperature=0).texts
    with (run.path / "samples.jsonl").open("w") as fh:
        for p, r, a in zip(prompts, refs, answers):
            fh.write(json.dumps({"prompt": p, "reference": r, "generation": a}, ensure_ascii=False) + "\n")
