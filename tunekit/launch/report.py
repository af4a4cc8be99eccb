"""Print a memory plan as a table (stdout): the recipe's setup beside the recommended one."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunekit.launch.plan import USABLE_SHARE, Plan, gib

ROW_ORDER = ("weights", "adapter", "gradients", "ddp buckets", "optimizer", "reference/value", "activations",
             "logits + loss")


def plan_table(plan: Plan) -> Table:
    rec = plan.recommendation
    show_rec = rec is not None and rec.setup != plan.setup
    table = Table(title=f"{plan.shape.name}: {plan.shape.total_params / 1e9:.2f}B parameters, "
                        f"{plan.setup.world} x {gib(plan.gpu_mem)}", title_justify="left")
    table.add_column("per GPU")
    table.add_column("recipe", justify="right")
    table.add_column("detail")
    if show_rec:
        table.add_column("recommended", justify="right")
    names = [n for n in ROW_ORDER if any(r.name == n for r in plan.rows + (rec.rows if show_rec else []))]
    for name in names:
        detail = next((r.detail for r in plan.rows if r.name == name), "")
        cells = [name, gib(plan.row(name)), detail]
        if show_rec:
            cells.append(gib(rec.row(name)))
        table.add_row(*cells)
    peak = ["[bold]peak[/bold]", f"[bold]{gib(plan.peak)}[/bold]",
            f"weights + optimizer + max(activations + logits, gradients); fits if <= {USABLE_SHARE:.0%} of the GPU"]
    if show_rec:
        peak.append(f"[bold]{gib(rec.peak)}[/bold]")
    table.add_row(*peak, end_section=True)
    if plan.host_bytes or (show_rec and rec.host_bytes):
        host = ["host RAM / rank", gib(plan.host_bytes), "offloaded parameters and optimizer"]
        if show_rec:
            host.append(gib(rec.host_bytes))
        table.add_row(*host)
    return table


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(highlight=False, width=140)
    console.print(plan_table(plan))
    console.print(f"recipe: {plan.setup.describe()}")
    if plan.refused:
        console.print(f"[red]refused:[/red] {plan.refused}")
    else:
        state = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
        console.print(f"  estimated peak {gib(plan.peak)} per GPU: {state}")
    for note in plan.notes:
        console.print(f"  note: {note}")
    rec = plan.recommendation
    if rec is None:
        console.print("[red]nothing fits[/red]: add GPUs (--gpus/--nodes), shorten data.max_length, or use QLoRA")
    else:
        console.print(f"recommended: [bold]{rec.setup.describe()}[/bold]: estimated peak {gib(rec.peak)} per GPU")
        for note in rec.notes:
            console.print(f"  note: {note}")
