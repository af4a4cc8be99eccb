"""`tunekit run PIPELINE.yaml [--dry-run] [--force S] [--only S] [--until S] [--resume] [--overwrite]`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import user_errors

HELP = """Run a pipeline file: every stage (sft, rm, dpo, grpo, ppo, cai, merge, quantize, eval) validated before
the first starts, each skipped when its fingerprint (recipe, input files, upstream stages, versions) is unchanged.
See docs/pipelines.md and recipes/pipelines/."""


def register(app: typer.Typer) -> None:
    app.command("run", help=HELP)(run)


@user_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (e.g. recipes/pipelines/assistant-demo.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan (cached / will run / why)."),
    force: list[str] = typer.Option([], "--force", help="Re-run this stage (and what depends on it)."),
    only: list[str] = typer.Option([], "--only", help="Run only this stage (its inputs must be up to date)."),
    until: str = typer.Option(None, "--until", help="Run this stage and what it depends on, nothing after."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted stage from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run into an existing folder that is not a "
                                   "pipeline output."),
    output: Path = typer.Option(None, "--output", "-o", help="Output folder (overrides the file's `output`)."),
) -> None:
    from tunekit.pipeline.run import run_file

    code = run_file(pipeline, dry_run=dry_run, force=list(force), only=list(only), until=until, resume=resume,
                    overwrite=overwrite, output=output)
    if code:
        raise typer.Exit(code)
