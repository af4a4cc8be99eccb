"""`tunekit eval MODEL_OR_RUN --data FILE`: perplexity on assistant tokens and exact match of greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunekit.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("eval", help="Score a model, adapter or run: perplexity and exact match; pairwise accuracy of a "
                "reward model; preference accuracy of a DPO policy; mean reward (--reward).")(eval_cmd)


@user_errors
def eval_cmd(
    target: str = typer.Argument(..., help="Run directory, adapter folder, model folder, hub id or alias."),
    data: str = typer.Option(..., "--data", "-d", help="Evaluation data (any format tunekit reads)."),
    base: str = typer.Option(None, "--base", help="Base model for an adapter folder that does not name one."),
    max_length: int = typer.Option(1024, help="Token limit per conversation."),
    max_new_tokens: int = typer.Option(64, help="Generation budget for exact match."),
    limit: int = typer.Option(None, help="Evaluate only the first N records."),
    batch_size: int = typer.Option(8, help="Conversations per forward pass."),
    no_generate: bool = typer.Option(False, "--no-generate", help="Perplexity only (skip generation)."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the full result (with answers) as JSON."),
    reward: list[str] = typer.Option([], "--reward", help="Mean reward of greedy answers (e.g. math_answer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model folder's own Python code (never taken from a run dir)."
    ),
) -> None:
    from tunekit.cli.common import check_range
    from tunekit.errors import TunekitError
    from tunekit.evaluation.runs import evaluate_target
    from tunekit.run import guard

    check_range("--max-length", max_length, 8)
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--limit", limit, 1)
    check_range("--batch-size", batch_size, 1)
    if no_generate and max_new_tokens != 64:
        raise TunekitError("--max-new-tokens: no effect with --no-generate")
    if reward and no_generate:
        raise TunekitError("--reward: no effect with --no-generate (rewards score generated answers)")
    if reward:  # every name is checked (typo, empty, a user function that does not import) before any work
        from tunekit.rewards import RewardSet

        RewardSet.from_specs([{"name": name} for name in reward])
    inputs = [target, data, base]
    # the output guard before any work: not an input, writable, no other writer (held until the file is written)
    held = guard.acquire(output, inputs, overwrite) if output is not None else None
    try:
        result = evaluate_target(target, data, base, limit, max_length, max_new_tokens, batch_size,
                                 not no_generate, reward, trust_remote_code=trust_remote_code)
        summary = {k: v for k, v in result.items() if k != "answers"}
        summary["target"] = target
        if output is not None:
            from tunekit.run.atomic import atomic_output

            with atomic_output(output, overwrite, is_dir=False, inputs=inputs) as tmp:
                tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        typer.echo(json.dumps(summary))
    finally:
        if held is not None:
            held.release()
