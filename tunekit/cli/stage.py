"""One Typer command shape for every training stage (sft, rm, dpo, grpo, ppo, rloo, distill, cai):

    tunekit STAGE RECIPE.yaml [--set KEY=VALUE]... [--output DIR] [--overwrite] [--resume] [--dry-run]
                              [--print-config]

The command only resolves the recipe (with `stage` set to the command's) and hands it to the stage's run
function; a recipe written for another stage is refused with the command to use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from tunekit.cli.common import user_errors
from tunekit.cli.launch_options import launch_options, maybe_relaunch
from tunekit.errors import TunekitError


def resolve_recipe(stage: str, recipe: Path | None, set_: list[str], output: Path | None):
    """The validated recipe for `stage`: file, then `--set` overrides, then `--output`."""
    from tunekit.config.load import load_recipe, read_yaml
    from tunekit.paths import resolve_shipped_recipe

    if recipe is not None:
        recipe = resolve_shipped_recipe(recipe)  # a shipped recipe by name works from any folder
        data, lines = read_yaml(recipe)
        declared = data.get("stage")
        if declared is not None and declared != stage:
            line = lines.get("stage")
            raise TunekitError(f"{recipe}:{line}: this recipe is for stage '{declared}'; run `tunekit {declared}` "
                               f"(or change `stage:`)")
    overrides = list(set_)
    if output is not None:
        import json

        overrides.append(f"output={json.dumps(str(output))}")  # a string as given: `-o '~'` is not YAML's null
    return load_recipe(recipe, overrides, defaults={"stage": stage})


def stage_command(app: typer.Typer, stage: str, help: str, runner: str) -> None:
    """Register `tunekit STAGE`; `runner` = "module:function" taking (recipe, overwrite=, resume=)."""

    @user_errors
    @launch_options
    def command(
        recipe: Path = typer.Argument(None, help="Recipe YAML (see recipes/). Optional if --set gives everything."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set train.lr=1e-4"),
        output: Path = typer.Option(None, "--output", "-o", help="Run directory (overrides `output`)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory when done."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Resolve the recipe, build the model on the meta device, count parameters."
        ),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
        launch: dict | None = None,
    ) -> None:
        from tunekit.config.load import dump_recipe

        cfg = resolve_recipe(stage, recipe, set_, output)
        if print_config:
            typer.echo(dump_recipe(cfg), nl=False)
            return
        if dry_run:
            from tunekit.stages import common

            common.dry_run(cfg)
            return
        module, fn = runner.split(":")
        run = getattr(importlib.import_module(module), fn)

        def check() -> None:  # the stage's own checks, before a launch spawns its workers
            from tunekit.stages.runner import check_inputs

            check_inputs(run, cfg, overwrite=overwrite, resume=resume)

        code = maybe_relaunch(cfg, launch or {}, check)  # --gpus/--nodes/--strategy: rerun under accelerate launch
        if code is not None:
            raise typer.Exit(code)
        run(cfg, overwrite=overwrite, resume=resume)

    command.__name__ = stage
    app.command(stage, help=help)(command)


#: the training commands: name -> (help, "module:run function")
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("Supervised fine-tuning from a YAML recipe: full, LoRA, DoRA, PiSSA, MiLoRA, LoRA-XS, SVFT; QLoRA with a "
            "4-bit base.", "tunekit.stages.sft:run_sft"),
    "rm": ("Reward model (Bradley-Terry) on preference pairs: a one-output score head on any backbone.",
           "tunekit.stages.rm:run_rm"),
    "dpo": ("Direct Preference Optimization on preference pairs (TRL's DPO loss family).",
            "tunekit.stages.dpo:run_dpo"),
    "grpo": ("Group Relative Policy Optimization on prompts with verifiable rewards or a reward model.",
             "tunekit.stages.grpo:run_grpo"),
    "ppo": ("RLHF with PPO: a reward model (`tunekit rm` run) and/or verifiable rewards, per-token KL to the "
            "reference, GAE, clipped policy and value losses.", "tunekit.stages.ppo:run_ppo"),
    "rloo": ("REINFORCE Leave-One-Out on prompts with the same rewards as grpo: A_i = r_i − mean of the other "
             "k−1 samples' rewards.", "tunekit.stages.rloo:run_rloo"),
    "distill": ("On-policy distillation (GKD) from a teacher sharing the student's tokenizer: generalised JSD per "
                "token.", "tunekit.stages.distill:run_distill"),
    "kto": ("KTO on unpaired feedback (prompt, completion, label: true|false) or split preference pairs; reference "
            "= the start model.", "tunekit.stages.kto:run_kto"),
    "orpo": ("ORPO on preference pairs: SFT and alignment in one stage from the base model, no reference model.",
             "tunekit.stages.orpo:run_orpo"),
    "simpo": ("SimPO (or CPO with simpo.variant: cpo) on preference pairs: reference-free, length-normalised "
              "rewards.", "tunekit.stages.simpo:run_simpo"),
}


def register(app: typer.Typer) -> None:
    for name, (help_text, runner) in STAGES.items():
        stage_command(app, name, help_text, runner)
