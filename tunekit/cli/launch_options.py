"""`--gpus/--nodes/--strategy/--main-address/--main-port/--machine-rank` for every training command.

Decorate a stage command with `@launch_options` and give it a `launch` parameter; after loading the recipe call
`relaunched = maybe_relaunch(cfg, launch)` and return if it is not None (the launched run's exit code).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import typer

from tunekit.launch.accelerate import LaunchOptions

_OPTIONS = [
    ("gpus", int | None, typer.Option(None, "--gpus", help="GPUs (processes) per node; default: launch.gpus.")),
    ("nodes", int | None, typer.Option(None, "--nodes", help="Machines; default: launch.nodes.")),
    ("strategy", str | None, typer.Option(
        None, "--strategy", help="ddp|zero1|zero2|zero3|zero3_offload|fsdp2|auto (auto = `tunekit plan`'s choice)."
    )),
    ("main_address", str | None, typer.Option(None, "--main-address", help="Multi-node: address of machine 0.")),
    ("main_port", int, typer.Option(29500, "--main-port", help="Multi-node: port on machine 0.")),
    ("machine_rank", int, typer.Option(0, "--machine-rank", help="Multi-node: this machine's rank (0..nodes-1).")),
]


def launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Replace `fn`'s `launch` parameter by the six launch options; `fn` receives them as a dict
    (resolved against the recipe by `maybe_relaunch`)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "launch"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
               for name, ann, default in _OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, None) for name, _, _ in _OPTIONS}
        return fn(*args, launch=given, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def resolve(recipe: Any, given: dict[str, Any]) -> LaunchOptions:
    """Command-line options over the recipe's `launch` section."""
    from tunekit.errors import TunekitError

    for name, flag in (("gpus", "--gpus"), ("nodes", "--nodes")):
        if given.get(name) is not None and given[name] < 1:
            raise TunekitError(f"{flag}: must be at least 1, got {given[name]}")
    port = given.get("main_port")
    if port is not None and not 1 <= port <= 65535:
        raise TunekitError(f"--main-port: must be a TCP port (1 to 65535), got {port}")
    section = recipe.launch
    nodes = given.get("nodes") or section.nodes
    rank = given.get("machine_rank")
    if rank is not None and not 0 <= rank < nodes:
        raise TunekitError(f"--machine-rank: must be 0 to {nodes - 1} (one per machine of --nodes {nodes}), "
                           f"got {rank}")
    return LaunchOptions(
        gpus=given.get("gpus") or section.gpus,
        nodes=given.get("nodes") or section.nodes,
        strategy=given.get("strategy") or section.strategy,
        main_address=given.get("main_address"),
        main_port=given.get("main_port") or 29500,
        machine_rank=given.get("machine_rank") or 0,
    )


def maybe_relaunch(recipe: Any, given: dict[str, Any], check: Callable[[], None] | None = None) -> int | None:
    """Relaunch this very command under `accelerate launch` when the options ask for it; None = train here.
    `check` (the stage's input checks) runs first, in this process, so bad input fails before any worker."""
    from tunekit.errors import TunekitError
    from tunekit.launch.accelerate import needs_launch, relaunch
    from tunekit.launch.plan import STRATEGIES
    from tunekit.stages.common import output_of

    opts = resolve(recipe, given)
    if opts.strategy not in (*STRATEGIES, "auto"):
        raise TunekitError(f"--strategy '{opts.strategy}': expected one of {', '.join(STRATEGIES)} or auto")
    if not needs_launch(opts, opts.strategy):
        return None
    return relaunch(recipe, opts, sys.argv[1:], output_of(recipe).resolve(), check=check)
