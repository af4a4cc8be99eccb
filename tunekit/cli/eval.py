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
    from tunekit.evaluation.command import EvalRequest, run_eval
    from tunekit.evaluation.report import summary

    check_range("--max-length", max_length, 8)
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--limit", limit, 1)
    check_range("--batch-size", batch_size, 1)
    check_range("--num-fewshot", num_fewshot, 0)
    if no_generate and max_new_tokens != 64:
        raise TunekitError("--max-new-tokens: no effect with --no-generate")

    doc = run_eval(EvalRequest(
        target=target, data=data, tasks=tasks, against=against, judge=judge, judge_template=judge_template,
        num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, base=base, max_length=max_length,
        max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size, generate=not no_generate, rewards=reward,
        output=output, overwrite=overwrite, trust_remote_code=trust_remote_code))
    typer.echo(json.dumps(summary(doc), ensure_ascii=False))
