"""The road of `tunekit run`: read → resolve and validate every stage → lock OUT → plan → print it → run the
stages that are not cached → report. Nothing is written before every stage validated."""

from __future__ import annotations

import signal
from pathlib import Path

from tunekit.console import console
from tunekit.pipeline.fingerprint import FileHashes
from tunekit.pipeline.plan import StagePlan, make_plan, state_dir
from tunekit.pipeline.resolve import Resolved, resolve_pipeline
from tunekit.pipeline.spec import PipelineSpec, read_pipeline


def print_plan(spec: PipelineSpec, plans: list[StagePlan]) -> None:
    from rich.table import Table

    table = Table(title=f"plan: {spec.path} -> {spec.output}")
    for col in ("stage", "command", "inputs", "action", "why"):
        table.add_column(col)
    style = {"cached": "green", "run": "yellow", "resume": "yellow", "skip": "dim"}
    for p in plans:
        inputs = ", ".join([*p.resolved.needs, *(Path(i).name for i in p.resolved.inputs)])
        action = {"run": "will run", "resume": "will resume"}.get(p.action, p.action)
        table.add_row(p.name, p.command, inputs, f"[{style[p.action]}]{action}[/]", p.why)
    console.print(table)


def print_estimates(resolved: dict[str, Resolved]) -> None:
    """`tunekit plan`'s per-GPU memory estimate for each training stage (printed only on a GPU)."""
    from tunekit.launch.plan import startup_estimate

    for res in resolved.values():
        if res.recipe is None:
            continue
        try:
            found = startup_estimate(res.recipe, res.command)
        except Exception as exc:  # noqa: BLE001 - an estimate never stops a pipeline
            console.print(f"[yellow]warning: stage {res.name}: no memory estimate ({type(exc).__name__})[/yellow]")
            continue
        if found is not None:
            line, exceeds = found
            warn = " [yellow](exceeds this GPU's free memory; see `tunekit plan`)[/yellow]" if exceeds else ""
            console.print(f"memory plan, stage {res.name}: {line}{warn}")


def run_file(path: str | Path, dry_run: bool = False, force: list[str] = (), only: list[str] = (),
             until: str | None = None, resume: bool = False, overwrite: bool = False,
             output: str | Path | None = None) -> int:
    from tunekit.paths import resolve_shipped_recipe
    from tunekit.pipeline.execute import check_output_folder, run_pipeline
    from tunekit.pipeline.report import print_table
    from tunekit.run import guard

    spec = read_pipeline(resolve_shipped_recipe(path), output)
    resolved = resolve_pipeline(spec)  # every stage validated before anything runs or is written
    print_estimates(resolved)
    if dry_run:
        print_plan(spec, make_plan(spec, resolved, force, only, until, resume, FileHashes()))
        return 0
    check_output_folder(spec, overwrite)
    held = guard.lock(spec.output)  # a second `tunekit run` on this output is refused here
    previous = _stop_on_sigterm()
    try:
        hashes = FileHashes(state_dir(spec) / "file-hashes.json")
        plans = make_plan(spec, resolved, force, only, until, resume, hashes)
        print_plan(spec, plans)
        record = run_pipeline(spec, plans, hashes)
        print_table(spec, record)
    finally:
        held.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _stop_on_sigterm():
    """A scheduler's SIGTERM (SLURM preemption, `timeout`, `kill`) stops the pipeline as Ctrl-C does: the
    running stage keeps its checkpoints for --resume and pipeline.json/report.md record it as interrupted."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)
