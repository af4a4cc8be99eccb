"""`tunekit sft RECIPE.yaml [--set KEY=VALUE]... [--output DIR] [--overwrite] [--resume] [--dry-run]`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command(
        "sft",
        help="Supervised fine-tuning from a YAML recipe: full, LoRA, DoRA, PiSSA, MiLoRA, LoRA-XS, SVFT; "
        "QLoRA with a 4-bit base.",
    )(sft)


@user_errors
def sft(
    recipe: Path = typer.Argument(None, help="Recipe YAML (see recipes/). Optional if --set gives everything."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set train.lr=1e-4"),
    output: Path = typer.Option(None, "--output", "-o", help="Run directory (overrides `output`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory when done."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve the recipe, build the model on the meta device, count parameters."
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
) -> None:
    from tunekit.config.load import dump_recipe, load_recipe

    overrides = list(set_)
    if output is not None:
        overrides.append(f"output={output}")
    cfg = load_recipe(recipe, overrides)
    if print_config:
        typer.echo(dump_recipe(cfg), nl=False)
        return
    from tunekit.stages import common

    if dry_run:
        common.dry_run(cfg)
        return
    from tunekit.stages.sft import run_sft

    run_sft(cfg, overwrite=overwrite, resume=resume)
