"""`tunekit plan RECIPE.yaml --gpu-mem 24GiB [--gpus N] [--nodes M] [--strategy S] [--apply OUT.yaml]`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import one_command, user_errors


@user_errors
def plan(
    recipe: Path = typer.Argument(None, help="Recipe YAML. Optional if --set gives everything."),
    gpu_mem: str = typer.Option(..., "--gpu-mem", help="Memory of one GPU: 24GiB, 80GB, 40 (GiB)."),
    gpus: int = typer.Option(1, "--gpus", help="GPUs per node."),
    nodes: int = typer.Option(1, "--nodes", help="Machines."),
    strategy: str = typer.Option(
        "auto", "--strategy", help="ddp|zero1|zero2|zero3|zero3_offload|fsdp2|auto (auto = the recipe's / ddp)."
    ),
    stage: str = typer.Option(
        None, "--stage", help="Plan for this stage (sft, rm, dpo, grpo, ppo, rloo, distill, cai)."
    ),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set data.max_length=2048"),
    apply: Path = typer.Option(None, "--apply", help="Write the recommended configuration into this recipe."),
) -> None:
    from tunekit.config.load import dump_recipe, load_recipe
    from tunekit.errors import TunekitError
    from tunekit.launch.plan import apply_to_recipe, estimate
    from tunekit.launch.report import print_plan
    from tunekit.paths import resolve_shipped_recipe

    recipe = resolve_shipped_recipe(recipe) if recipe is not None else None
    cfg = load_recipe(recipe, list(set_))
    if apply is not None and apply.exists():
        raise TunekitError(f"--apply '{apply}' already exists; choose a new file")
    if apply is not None:  # never inside the model folder, the data or any other input of the recipe
        from tunekit.run import guard
        from tunekit.stages.common import recipe_inputs

        guard.check_overlap(apply, recipe_inputs(cfg))
    result = estimate(cfg, gpu_mem, gpus=gpus, nodes=nodes, strategy=None if strategy == "auto" else strategy,
                      stage=stage)
    print_plan(result)
    if apply is not None:
        if result.recommendation is None:
            raise TunekitError(f"nothing fits in {gpu_mem} per GPU; --apply wrote nothing")
        apply.write_text(dump_recipe(apply_to_recipe(cfg, result.recommendation.setup)), encoding="utf-8")
        typer.echo(f"wrote {apply}")


register = one_command(
    "plan", plan, help="Will it fit? Per-GPU memory of a recipe from config.json alone (no weights read), and the "
    "fastest configuration that fits the budget.",
)
