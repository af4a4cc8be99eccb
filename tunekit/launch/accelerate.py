"""Relaunch a training command under `accelerate launch` with a generated accelerate config and a DeepSpeed JSON
or FSDP2 settings; print the exact command so it can be reused.

The parent process (`tunekit sft ... --gpus 2`) resolves the strategy (`auto` = the memory planner's choice) and
the run directory, writes `<output>.launch/accelerate.yaml` (+ `deepspeed.json`), and runs
`accelerate launch --config_file ... -m tunekit sft ...` with `TUNEKIT_LAUNCHED=1`, so the children train
instead of relaunching. The parent checks the stage's inputs (recipe, output, data) before it writes or spawns
anything; an error a worker still meets is handed back and printed once (tunekit/launch/launcher.py).
accelerate, DeepSpeed and FSDP2 do the distributed work; tunekit only writes their configs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunekit.errors import TunekitError

LAUNCHED_ENV = "TUNEKIT_LAUNCHED"
DEEPSPEED_ENV = "TUNEKIT_DEEPSPEED_CONFIG"
STRATEGY_ENV = "TUNEKIT_STRATEGY"
ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}


@dataclass(frozen=True)
class LaunchOptions:
    gpus: int = 1
    nodes: int = 1
    strategy: str = "auto"
    main_address: str | None = None
    main_port: int = 29500
    machine_rank: int = 0

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


def deepspeed_config(strategy: str, bucket: int = 50_000_000) -> dict[str, Any]:
    """DeepSpeed JSON for a ZeRO strategy; `auto` values are filled in by transformers from TrainingArguments."""
    stage = ZERO_STAGE[strategy]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket}
    if stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    if strategy == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_allow_untested_optimizer": True,  # the Trainer's own optimizer (recipe train.optim) is wrapped
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def accelerate_config(opts: LaunchOptions, strategy: str, mixed_precision: str, deepspeed_file: Path | None,
                      checkpointing: bool = False) -> dict[str, Any]:
    """The accelerate config file (what `accelerate config` would write) for a resolved strategy."""
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": opts.nodes,
        "num_processes": opts.world,
        "machine_rank": opts.machine_rank,
        "mixed_precision": mixed_precision,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if opts.nodes > 1:
        cfg["main_process_ip"] = opts.main_address
        cfg["main_process_port"] = opts.main_port
    if strategy in ZERO_STAGE:
        # precision comes from the JSON's `auto` (TrainingArguments.bf16); accelerate refuses it in both places
        del cfg["mixed_precision"]
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file),
                                   "zero3_init_flag": ZERO_STAGE[strategy] == 3}
    elif strategy == "fsdp2":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            # every rank builds the model on meta, rank 0 loads the weights and broadcasts them (QLoRA+FSDP trap)
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": checkpointing,
        }
    else:
        cfg["distributed_type"] = "MULTI_GPU" if opts.world > 1 else "NO"
    return cfg


def resolve_strategy(recipe: Any, opts: LaunchOptions) -> str:
    """`auto` → the planner's recommendation for this many GPUs of this device's memory (ddp off-GPU)."""
    if opts.strategy != "auto":
        return opts.strategy
    mem = device_memory()
    if mem is None:
        return "ddp"
    from tunekit.launch.plan import estimate

    plan = estimate(recipe, mem, gpus=opts.gpus, nodes=opts.nodes)
    if plan.fits or plan.recommendation is None:
        return plan.setup.strategy
    return plan.recommendation.setup.strategy


def device_memory() -> float | None:
    """Total memory of GPU 0 in bytes, or None without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory)


def check_compatible(recipe: Any, strategy: str, opts: LaunchOptions) -> None:
    """Refuse the combinations that cannot work, naming the alternative."""
    quantized = recipe.model.load_in_4bit or recipe.model.load_in_8bit
    if quantized and strategy in ("zero3", "zero3_offload"):
        raise TunekitError(
            f"--strategy {strategy}: DeepSpeed ZeRO-3 cannot partition a bitsandbytes 4/8-bit base; use "
            "--strategy fsdp2 (QLoRA + FSDP2) or zero2, or load the base in 16-bit"
        )
    if recipe.model.load_in_8bit and strategy == "fsdp2":
        raise TunekitError("--strategy fsdp2: FSDP2 cannot shard an 8-bit base; use model.load_in_4bit or zero2")
    if opts.nodes > 1 and not opts.main_address:
        raise TunekitError("--nodes > 1 needs --main-address (the rank-0 machine's address) and --machine-rank")
    if not 0 <= opts.machine_rank < opts.nodes:
        raise TunekitError(f"--machine-rank {opts.machine_rank}: expected 0..{opts.nodes - 1}")
    if strategy in ZERO_STAGE:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise TunekitError(f"--strategy {strategy} needs DeepSpeed: pip install 'tunekit[deepspeed]'")


def needs_launch(opts: LaunchOptions, strategy: str) -> bool:
    """Relaunch unless already launched, or one process without DeepSpeed/FSDP."""
    if os.environ.get(LAUNCHED_ENV) == "1":
        return False
    return opts.world > 1 or strategy not in ("ddp", "auto")


def write_launch_files(folder: Path, opts: LaunchOptions, strategy: str, mixed_precision: str,
                       checkpointing: bool = False) -> Path:
    """Write accelerate.yaml (+ deepspeed.json) into `folder`; returns the accelerate config path."""
    folder.mkdir(parents=True, exist_ok=True)
    ds_file = None
    if strategy in ZERO_STAGE:
        ds_file = folder / "deepspeed.json"
        ds_file.write_text(json.dumps(deepspeed_config(strategy), indent=2) + "\n")
    cfg_file = folder / "accelerate.yaml"
    cfg_file.write_text(yaml.safe_dump(accelerate_config(opts, strategy, mixed_precision, ds_file, checkpointing),
                                       sort_keys=False))
    return cfg_file


def launch_command(config_file: Path, argv: list[str]) -> list[str]:
    """`python -m tunekit.launch.launcher --config_file CFG -m tunekit ARGV...`: `accelerate launch` that leaves
    a worker's error to the one line this process prints (tunekit/launch/launcher.py)."""
    return [sys.executable, "-m", "tunekit.launch.launcher", "--config_file", str(config_file),
            "-m", "tunekit", *argv]


def relaunch(recipe: Any, opts: LaunchOptions, argv: list[str], output: Path,
             check: Callable[[], None] | None = None) -> int:
    """Check the inputs here (`check`: the stage's own checks, before anything is written or spawned), write the
    launch files beside the run directory, print the command, run it; returns its exit code. A worker's error is
    printed here once, as the one line it would have printed alone."""
    from tunekit.console import console
    from tunekit.errors import WORKER_ERROR_ENV, worker_error
    from tunekit.models.load import device_type, resolve_dtype

    strategy = resolve_strategy(recipe, opts)
    check_compatible(recipe, strategy, opts)
    if check is not None:
        check()
    import torch

    cuda = device_type() == "cuda"
    mixed = "bf16" if cuda and resolve_dtype(recipe.model) == torch.bfloat16 else "no"
    folder = Path(str(output) + ".launch")
    made = not folder.exists()  # removed again when the launched run fails: a failed start leaves no debris
    if opts.nodes > 1:  # each machine writes its own machine_rank (a shared filesystem must not mix them)
        folder = folder / f"machine-{opts.machine_rank}"
    cfg_file = write_launch_files(folder, opts, strategy, mixed, recipe.train.gradient_checkpointing)
    # every rank must agree on the run directory: pin the resolved output (the default has a timestamp)
    child_argv = [*argv, "--set", f"output={output}"]
    cmd = launch_command(cfg_file, child_argv)
    report = folder / "worker-error.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, LAUNCHED_ENV: "1", STRATEGY_ENV: strategy, WORKER_ERROR_ENV: str(report)}
    if strategy in ZERO_STAGE:
        env[DEEPSPEED_ENV] = str(folder / "deepspeed.json")
        if not cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")
    shown = ["accelerate", "launch", *cmd[3:]]
    console.print(f"launch ({strategy}, {opts.world} process{'es' if opts.world > 1 else ''}): "
                  f"{LAUNCHED_ENV}=1 {shlex.join(shown)}", soft_wrap=True)
    code = subprocess.run(cmd, env=env).returncode
    reported = worker_error(report) if code != 0 else None
    report.unlink(missing_ok=True)
    if code != 0 and made and not Path(str(output) + ".partial").exists():
        shutil.rmtree(Path(str(output) + ".launch"), ignore_errors=True)
    if reported is not None:
        line, code = reported
        print(line, file=sys.stderr)
    return code


def trainer_overrides() -> dict[str, Any]:
    """TrainingArguments a launched child needs: the DeepSpeed JSON (on CPU too, with DS_ACCELERATOR=cpu)."""
    path = os.environ.get(DEEPSPEED_ENV)
    if not path or os.environ.get(LAUNCHED_ENV) != "1":
        return {}
    return {"deepspeed": path, "use_cpu": False}
