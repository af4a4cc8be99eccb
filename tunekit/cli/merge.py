"""`tunekit merge`: mergekit-style config merges, short forms and adapter folding (thin CLI)."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import one_command, user_errors

HELP = """Merge models (mergekit YAML configs), or fold an adapter into its base.

\b
  tunekit merge CONFIG.yml OUTPUT_DIR [--overwrite] [--dtype bf16] [--shard-size 5GB]
  tunekit merge --method slerp --t 0.5 A B -o OUT
  tunekit merge --method ties --base BASE --weights 1,1 --density 0.5 A B -o OUT
  tunekit merge --base BASE --adapter ADAPTER_OR_RUN -o OUT
"""


@user_errors
def merge(
    inputs: list[str] = typer.Argument(
        None, help="CONFIG.yml [OUTPUT_DIR]; with --method: the models (or adapters for adapter_sum)."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output folder."),
    method: str | None = typer.Option(
        None,
        "--method",
        help="linear, slerp, nuslerp, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, "
        "della, della_linear, model_stock, karcher, sce, adapter_sum (passthrough: use a slices config).",
    ),
    t: float | None = typer.Option(None, "--t", help="slerp interpolation factor (0 = first model/base)."),
    weights: str | None = typer.Option(None, "--weights", help="Comma-separated weights, one per model."),
    density: float | None = typer.Option(
        None, "--density", help="ties/dare/della/breadcrumbs density (fraction kept)."
    ),
    base: str | None = typer.Option(None, "--base", help="Base model (task vectors, slerp t=0, adapters)."),
    adapter: str | None = typer.Option(
        None, "--adapter", help="Adapter folder or tunekit run dir to fold in."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype: float32, float16, bfloat16."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Maximum output shard size."),
    seed: int = typer.Option(0, "--seed", help="Seed for DARE's and DELLA's random drops (per tensor)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    from tunekit.merge.engine import run_merge_command

    run_merge_command(
        inputs=list(inputs or []),
        output=output,
        method=method,
        t=t,
        weights=weights,
        density=density,
        base=base,
        adapter=adapter,
        overwrite=overwrite,
        dtype=dtype,
        shard_size=shard_size,
        seed=seed,
        progress=progress,
    )


register = one_command("merge", merge, help=HELP)
