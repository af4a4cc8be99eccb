"""`tunekit cai RECIPE.yaml [--phase critique|sft|feedback|dpo|eval|all] [--set KEY=VALUE]...`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import one_command, user_errors


@user_errors
def cai(
    recipe: Path = typer.Argument(None, help="Recipe YAML with a `cai:` section. Optional if --set gives everything."),
    phase: str = typer.Option("all", "--phase", "-p", help="critique, sft, feedback, dpo, eval or all."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set cai.revision_rounds=2"),
    output: Path = typer.Option(None, "--output", "-o", help="Run directory (overrides `output`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo the phase(s), discarding their outputs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted phase; skip finished ones (all)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
) -> None:
    from tunekit.cli.stage import resolve_recipe
    from tunekit.config.load import dump_recipe

    cfg = resolve_recipe("cai", recipe, set_, output)
    if print_config:
        typer.echo(dump_recipe(cfg), nl=False)
        return
    from tunekit.stages.cai import run_cai

    path = run_cai(cfg, phase=phase, overwrite=overwrite, resume=resume)
    typer.echo(f"cai run: {path}")


register = one_command(
    "cai", cai, help="Constitutional AI: critique/revision SFT, then AI-feedback preferences trained with DPO "
    "(phases critique, sft, feedback, dpo, eval; see docs/cai.md).",
)
