"""`tunekit eval MODEL_OR_RUN --data FILE`: perplexity on assistant tokens and exact match of greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunekit.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("eval", help="Perplexity and exact match of a model, adapter or run on a dataset.")(eval_cmd)


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
) -> None:
    from tunekit.data.formats import to_messages
    from tunekit.data.sources import read_source
    from tunekit.evaluation.score import evaluate
    from tunekit.models.trained import load_any

    records = read_source(data)[:limit] if limit else read_source(data)
    conversations = [to_messages(r.data, "auto", r.where) for r in records]
    model, tok = load_any(target, base)
    result = evaluate(model, tok, conversations, max_length, max_new_tokens, batch_size, not no_generate)
    summary = {k: v for k, v in result.items() if k != "answers"}
    summary["target"] = target
    typer.echo(json.dumps(summary))
    if output is not None:
        output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
