"""OUT/pipeline.json and OUT/report.md: one table of every stage (status, wall time, headline metrics, plots),
and the eval stages' results side by side per target. The terminal ends with the same table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunekit.pipeline.spec import PipelineSpec

#: run-card metrics worth a column, by name fragment (first match wins the order)
HEADLINE = ("train_loss", "eval_loss", "accuracy", "accuracies", "margins", "reward", "kl")
NOT_HEADLINE = ("runtime", "per_second", "samples", "steps", "epoch", "flos", "std", "chosen", "rejected/")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


#: numbers of an eval result that are counts or settings, not results
NOT_METRIC = ("records", "n", "tokens", "limit", "max_length", "max_new_tokens", "batch_size")


def eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Numbers of one eval result, whichever shape: `metrics: {name: {value, stderr}}` or flat keys."""
    source = result.get("metrics") if isinstance(result.get("metrics"), dict) else result
    out = {}
    for key, value in source.items():
        number = _number(value)
        if number is not None and key not in NOT_METRIC:
            out[str(key)] = number
    return out


def baseline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The baseline's numbers in one eval result (`against:`: each metric's `baseline` entry)."""
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    out = {}
    for key, entry in metrics.items():
        number = _number(entry.get("baseline")) if isinstance(entry, dict) else None
        if number is not None and key not in NOT_METRIC:
            out[str(key)] = number
    return out


def eval_notes(data: dict[str, Any]) -> str:
    """One line on what an eval stage measured beyond data files: its tasks, its baseline, its judge."""
    notes = []
    tasks = data.get("tasks")
    if isinstance(tasks, list) and tasks:
        notes.append("lm-evaluation-harness tasks " + ", ".join(f"`{Path(str(t)).stem}`" for t in tasks))
    if data.get("judge"):
        notes.append(f"win rate against `{data.get('against')}` judged by `{data['judge']}` (both orders, ties "
                     "count ½)")
    elif data.get("against"):
        notes.append(f"baseline `{data['against']}` (its column: the same measure on the baseline)")
    return "; ".join(notes)


def headline(folder: Path, command: str, artifact: Path) -> dict[str, float]:
    """A few metrics that say how the stage went."""
    if command == "eval":
        return {}
    if command == "quantize":
        card = _read_json(artifact.with_name(artifact.name + ".card.json")) or _read_json(artifact / "run_card.json")
        verify = card.get("verify") or {}
        out = {k: verify[k] for k in ("ppl_source", "ppl_quantized", "ppl_change_pct", "top1_agreement")
               if _number(verify.get(k)) is not None}
        if _number(verify.get("output_bytes")) is not None:
            out["size_mb"] = verify["output_bytes"] / 1e6
        return out
    if command == "merge":
        return {}
    card = _read_json((artifact if command == "cai" else folder) / "run_card.json")
    metrics = card.get("metrics") or {}
    out: dict[str, float] = {}
    for fragment in HEADLINE:
        for key, value in metrics.items():
            if fragment in key and not any(n in key for n in NOT_HEADLINE) and key not in out:
                number = _number(value)
                if number is not None:
                    out[key] = number
        if len(out) >= 4:
            break
    return dict(list(out.items())[:4])


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _seconds(entry: dict[str, Any]) -> str:
    if entry.get("seconds") is not None:
        return f"{entry['seconds']:.1f} s"
    if entry.get("seconds_when_run") is not None:
        return f"({entry['seconds_when_run']:.1f} s)"
    return ""


def stage_rows(spec: PipelineSpec, record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in record["stages"].items():
        folder = spec.output / name
        artifact = Path(entry["artifact"])
        plots = sorted(p.relative_to(spec.output).as_posix() for p in folder.glob("**/*.png")
                       if "checkpoints" not in p.parts) if folder.is_dir() else []
        metrics = headline(folder, entry["command"], artifact) if entry["status"] in ("ran", "cached") else {}
        rows.append({"stage": name, "command": entry["command"], "status": entry["status"],
                     "time": _seconds(entry), "metrics": metrics, "plots": plots})
    return rows


def eval_tables(spec: PipelineSpec, record: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{eval stage: {target: {metric: value}}}, plus a `<baseline> (baseline)` column with `against:`."""
    out = {}
    for name, entry in record["stages"].items():
        if entry["command"] != "eval" or entry["status"] not in ("ran", "cached"):
            continue
        data = _read_json(spec.output / name / "eval.json")
        targets = data.get("targets") if isinstance(data.get("targets"), dict) else {}
        table = {t: eval_metrics(r) for t, r in targets.items() if isinstance(r, dict)}
        baseline: dict[str, float] = {}
        for result in targets.values():
            if isinstance(result, dict):
                for key, value in baseline_metrics(result).items():
                    baseline.setdefault(key, value)  # the same baseline for every target
        if baseline:
            table[f"{data.get('against') or 'baseline'} (baseline)"] = baseline
        out[name] = table
    return out


def _metric_names(targets: dict[str, dict[str, float]]) -> list[str]:
    """Every metric of an eval table, in the order the results list them (the headline one first)."""
    return list(dict.fromkeys(m for values in targets.values() for m in values))


def markdown(spec: PipelineSpec, record: dict[str, Any]) -> str:
    lines = [f"# Pipeline {spec.path.name}", "", f"Output: `{spec.output}`; started {record['started']}, "
             f"finished {record.get('finished', '')}.", "",
             "| stage | command | status | wall time | metrics | plots |", "|---|---|---|---|---|---|"]
    for row in stage_rows(spec, record):
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in row["metrics"].items())
        plots = " ".join(f"[{Path(p).name}]({p})" for p in row["plots"])
        lines.append(f"| {row['stage']} | {row['command']} | {row['status']} | {row['time']} | {metrics} | {plots} |")
    for stage, targets in eval_tables(spec, record).items():
        data = _read_json(spec.output / stage / "eval.json")
        notes = eval_notes(data)
        lines += ["", f"## {stage}: eval results", "", *([notes, ""] if notes else []),
                  "| metric | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        for m in _metric_names(targets):
            cells = [(_fmt(targets[t][m]) if m in targets[t] else "") for t in targets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        results = data.get("targets") if isinstance(data.get("targets"), dict) else {}
        warnings = [(t, w) for t, r in results.items() if isinstance(r, dict)
                    for w in (r.get("warnings") if isinstance(r.get("warnings"), list) else [])]
        if warnings:
            lines += [""] + [f"- warning ({t}): {w}" for t, w in warnings]
    lines += ["", "Wall time in parentheses: the stage was cached; the time is that of the run that made it."]
    return "\n".join(lines) + "\n"


def print_table(spec: PipelineSpec, record: dict[str, Any]) -> None:
    from rich.table import Table

    from tunekit.console import console

    table = Table(title=f"pipeline {spec.path.name} -> {spec.output}")
    for col in ("stage", "command", "status", "wall time", "metrics"):
        table.add_column(col)
    for row in stage_rows(spec, record):
        table.add_row(row["stage"], row["command"], row["status"], row["time"],
                      ", ".join(f"{k} {_fmt(v)}" for k, v in row["metrics"].items()))
    console.print(table)
    for stage, targets in eval_tables(spec, record).items():
        t = Table(title=f"{stage}: eval results")
        t.add_column("metric")
        for target in targets:
            t.add_column(target, justify="right")
        for m in _metric_names(targets):
            t.add_row(m, *[(_fmt(targets[x][m]) if m in targets[x] else "") for x in targets])
        console.print(t)
    console.print(f"report: {spec.output / 'report.md'}")


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_report(spec: PipelineSpec, record: dict[str, Any]) -> None:
    for name, entry in record["stages"].items():  # which adapters each trained model stands on
        card = _read_json(spec.output / name / "run_card.json")
        if card.get("chained_from"):
            entry["chained_from"] = card["chained_from"]
    write_json(spec.output / "pipeline.json", record)
    (spec.output / "report.md").write_text(markdown(spec, record), encoding="utf-8")
