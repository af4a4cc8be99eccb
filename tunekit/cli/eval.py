"""`tunekit eval TARGET`: benchmarks (--tasks), a judge's win rate (--judge), or scores on the user's data
(--data); every mode prints one table and writes one eval.json shape (tunekit/evaluation/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunekit.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("eval", help="Score a model, adapter or run: lm-evaluation-harness tasks (--tasks); win rate "
                "against a baseline judged by a model (--against B --judge J --data prompts); on --data: "
                "perplexity and exact match, pairwise accuracy of a reward model, preference accuracy of a "
                "policy, mean reward (--reward). --against runs the baseline too and prints both.")(eval_cmd)


def judgements_path(output: Path) -> Path:
    """judgements.jsonl beside eval.json (or `<stem>.judgements.jsonl` beside another name)."""
    return output.with_name("judgements.jsonl" if output.name == "eval.json" else f"{output.stem}.judgements.jsonl")


@user_errors
def eval_cmd(
    target: str = typer.Argument(..., help="Run directory, adapter folder, model folder, hub id or alias."),
    data: str = typer.Option(None, "--data", "-d", help="Evaluation data (any format tunekit reads); the prompts "
                             "of --judge."),
    tasks: str = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks: comma-separated names "
                              "(gsm8k,ifeval,mmlu,hellaswag; shipped offline: tunekit_demo, tunekit_pref), a task "
                              "YAML or a folder of them."),
    against: str = typer.Option(None, "--against", help="Baseline to compare with (same kinds as TARGET)."),
    judge: str = typer.Option(None, "--judge", help="Judge model for a pairwise win rate against --against."),
    judge_template: str = typer.Option(None, "--judge-template", help="Judge questions: helpful-harmless "
                                       "(default), helpful, constitution (CAI's default principles), a "
                                       "constitution YAML or a text file with one question per line."),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="Few-shot examples per task item (--tasks)."),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template",
                                             help="Render task prompts with the chat template (--tasks)."),
    base: str = typer.Option(None, "--base", help="Base model for an adapter folder that does not name one."),
    max_length: int = typer.Option(1024, help="Token limit per conversation."),
    max_new_tokens: int = typer.Option(64, help="Generation budget for exact match, rewards and judged answers."),
    limit: int = typer.Option(None, help="Evaluate only the first N records (per task with --tasks)."),
    batch_size: int = typer.Option(8, help="Conversations per forward pass."),
    no_generate: bool = typer.Option(False, "--no-generate", help="Perplexity only (skip generation)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write eval.json (with per-item details); the judge "
                                "also writes judgements.jsonl beside it."),
    reward: list[str] = typer.Option([], "--reward", help="Mean reward of greedy answers (e.g. math_answer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model folder's own Python code (never taken from a run dir)."
    ),
) -> None:
    from tunekit.cli.common import check_range
    from tunekit.errors import TunekitError
    from tunekit.evaluation import report
    from tunekit.evaluation.runs import evaluate_data, evaluate_judge, evaluate_tasks, read_records
    from tunekit.run import guard

    check_range("--max-length", max_length, 8)
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--limit", limit, 1)
    check_range("--batch-size", batch_size, 1)
    check_range("--num-fewshot", num_fewshot, 0)
    if no_generate and max_new_tokens != 64:
        raise TunekitError("--max-new-tokens: no effect with --no-generate")
    mode = "tasks" if tasks is not None else "judge" if judge is not None else "data"
    _check_options(mode, data, against, reward, no_generate, num_fewshot, apply_chat_template, judge_template)
    # everything the user named is checked before the output guard and any model
    selection = None
    records = None
    if mode == "tasks":
        from tunekit.evaluation.harness import select_tasks

        selection = select_tasks(tasks)
    else:
        records = read_records(data, limit)
    if mode == "judge":
        from tunekit.evaluation.judge import judge_questions

        judge_questions(judge_template)
    if reward:
        from tunekit.rewards.registry import check_params

        for name in reward:
            if not name.strip():
                raise TunekitError("--reward: empty name (e.g. --reward math_answer)")
            check_params(name, {})
    inputs = [target, data, base, against, judge, judge_template]
    outputs = [output] + ([judgements_path(output)] if output is not None and mode == "judge" else [])
    held = [guard.acquire(o, inputs, overwrite) for o in outputs if o is not None]
    try:
        rows = None
        if mode == "tasks":
            mine = evaluate_tasks(target, selection, base, num_fewshot, limit, batch_size, apply_chat_template,
                                  trust_remote_code)
            theirs = (evaluate_tasks(against, selection, None, num_fewshot, limit, batch_size, apply_chat_template,
                                     trust_remote_code) if against else None)
        elif mode == "judge":
            mine, rows = evaluate_judge(target, against, judge, records, base, judge_template, max_new_tokens,
                                        batch_size, trust_remote_code)
            theirs = None
        else:
            kw = dict(max_length=max_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      generate=not no_generate, rewards=reward, trust_remote_code=trust_remote_code)
            mine = evaluate_data(target, records, base, **kw)
            theirs = evaluate_data(against, records, None, **kw) if against else None
        details = mine.details
        if theirs is not None and theirs.details is not None and details is not None:
            details = {"target": details, "baseline": theirs.details}
        doc = report.document(mine.mode, mine.measures, target, mine.metrics, mine.n, against,
                              theirs.metrics if theirs is not None else None,
                              {**mine.settings, **({"data": data} if data else {})}, details)
        if mine.warnings:
            doc["warnings"] = mine.warnings
        report.print_table(doc)
        for w in mine.warnings:
            from tunekit.console import console

            console.print(f"[yellow]warning:[/] {w}")
        if output is not None:
            if rows is not None:
                report.write_jsonl(rows, judgements_path(output), overwrite, inputs)
            report.write(doc, output, overwrite, inputs)
        typer.echo(json.dumps(report.summary(doc), ensure_ascii=False))
    finally:
        for h in held:
            h.release()


def _check_options(mode: str, data: str | None, against: str | None, reward: list[str], no_generate: bool,
                   num_fewshot: int | None, apply_chat_template: bool, judge_template: str | None) -> None:
    """Options that do not fit the mode are errors, not silently ignored."""
    from tunekit.errors import TunekitError

    if mode == "tasks":
        for flag, given in (("--data", data), ("--reward", reward), ("--no-generate", no_generate),
                            ("--judge-template", judge_template)):
            if given:
                raise TunekitError(f"{flag}: no effect with --tasks (the tasks bring their own data and metrics)")
        return
    for flag, given in (("--num-fewshot", num_fewshot is not None), ("--apply-chat-template", apply_chat_template)):
        if given:
            raise TunekitError(f"{flag}: only with --tasks")
    if mode == "judge":
        if not against:
            raise TunekitError("--judge: needs --against BASELINE (the model the target is judged against)")
        if not data:
            raise TunekitError("--judge: needs --data PROMPTS (held-out prompts both models answer)")
        for flag, given in (("--reward", reward), ("--no-generate", no_generate)):
            if given:
                raise TunekitError(f"{flag}: no effect with --judge")
        return
    if judge_template:
        raise TunekitError("--judge-template: only with --judge")
    if not data:
        raise TunekitError("--data: required (or --tasks NAMES for benchmarks)")
