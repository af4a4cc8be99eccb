"""One result format for every `tunekit eval` mode: the `eval.json` document, its table, its file.

    {"schema": "tunekit-eval/1", "mode": "tasks" | "judge" | "perplexity" | "preference" | "reward_model" | "reward",
     "measures": "<one line: what the numbers are>", "target": "...", "baseline": null | "...", "n": N,
     "metrics": {"<name>": {"value": v, "stderr": s | "ci": [lo, hi],
                            "baseline": {"value": ..., "stderr" | "ci": ...}, "difference": v − baseline}},
     "settings": {...}, "versions": {"tunekit": ..., "torch": ..., ...}, "details": [...] (eval.json only)}

The same mapping, less `details`, is printed to stdout as one JSON line; the table goes to the terminal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "tunekit-eval/1"
_PACKAGES = ("torch", "transformers", "peft", "trl", "lm_eval", "math_verify")


def versions(*extra: str) -> dict[str, str]:
    """Versions of tunekit and of the libraries an evaluation rests on (those installed)."""
    from importlib import metadata

    import tunekit

    out = {"tunekit": tunekit.__version__}
    for name in (*_PACKAGES, *extra):
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def metric(value: float | None, stderr: float | None = None, ci: tuple[float, float] | None = None) -> dict[str, Any]:
    """One metric entry: value with its standard error or its 95% interval (whichever the method gives)."""
    out: dict[str, Any] = {"value": _finite(value)}
    if stderr is not None:
        out["stderr"] = _finite(stderr)
    if ci is not None:
        out["ci"] = [_finite(ci[0]), _finite(ci[1])]
    return out


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: a non-finite number is written as null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def document(mode: str, measures: str, target: str, metrics: dict[str, dict[str, Any]], n: int | None = None,
             baseline: str | None = None, baseline_metrics: dict[str, dict[str, Any]] | None = None,
             settings: dict[str, Any] | None = None, details: list[dict[str, Any]] | None = None,
             extra_versions: tuple[str, ...] = ()) -> dict[str, Any]:
    """The eval.json mapping; with `baseline_metrics`, each metric gains `baseline` and `difference`."""
    merged: dict[str, dict[str, Any]] = {}
    for name, entry in metrics.items():
        merged[name] = dict(entry)
        if baseline_metrics is not None and name in baseline_metrics:
            base = baseline_metrics[name]
            merged[name]["baseline"] = dict(base)
            if entry.get("value") is not None and base.get("value") is not None:
                merged[name]["difference"] = entry["value"] - base["value"]
    doc: dict[str, Any] = {"schema": SCHEMA, "mode": mode, "measures": measures, "target": target,
                           "baseline": baseline, "n": n, "metrics": merged, "settings": settings or {},
                           "versions": versions(*extra_versions)}
    if details is not None:
        doc["details"] = details
    return doc


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without per-item details (what stdout carries)."""
    return {k: v for k, v in doc.items() if k != "details"}


def value(doc: dict[str, Any], name: str) -> float | None:
    """A metric's value, e.g. value(doc, "perplexity")."""
    return doc["metrics"][name]["value"]


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def _spread(entry: dict[str, Any]) -> str:
    if "stderr" in entry and entry["stderr"] is not None:
        return f"± {_fmt(entry['stderr'])}"
    if "ci" in entry:
        lo, hi = entry["ci"]
        return f"[{_fmt(lo)}, {_fmt(hi)}]"
    return ""


def print_table(doc: dict[str, Any]) -> None:
    """The document as a rich table on the terminal (stderr): one row per metric, baseline and difference
    columns when there is a baseline."""
    from rich.table import Table

    from tunekit.console import console

    title = f"tunekit eval · {doc['mode']} · {doc['target']}" + (f" vs {doc['baseline']}" if doc["baseline"] else "")
    table = Table(title=title, caption=doc["measures"] + (f" (n = {doc['n']})" if doc.get("n") else ""))
    with_base = any("baseline" in e for e in doc["metrics"].values())
    table.add_column("metric")
    table.add_column("target" if with_base else "value", justify="right")
    table.add_column("stderr / 95% CI", justify="right")
    if with_base:
        table.add_column("baseline", justify="right")
        table.add_column("stderr / 95% CI", justify="right")
        table.add_column("difference", justify="right")
    for name, entry in doc["metrics"].items():
        row = [name, _fmt(entry.get("value")), _spread(entry)]
        if with_base:
            base = entry.get("baseline") or {}
            diff = entry.get("difference")
            row += [_fmt(base.get("value")), _spread(base) if base else "",
                    "—" if diff is None else f"{diff:+.4f}"]
        table.add_row(*row)
    console.print(table)


def write(doc: dict[str, Any], path: str | Path, overwrite: bool, inputs: list[str | None]) -> None:
    """Write eval.json through the output guard (temp file, then rename; existing file needs overwrite)."""
    from tunekit.run.atomic import atomic_output

    with atomic_output(path, overwrite, is_dir=False, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(rows: list[dict[str, Any]], path: str | Path, overwrite: bool, inputs: list[str | None]) -> None:
    """Per-item records (judgements.jsonl) through the same guard."""
    from tunekit.run.atomic import atomic_output

    with atomic_output(path, overwrite, is_dir=False, inputs=inputs) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
