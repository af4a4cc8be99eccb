"""Standard benchmarks through EleutherAI's lm-evaluation-harness (Gao et al., 2021), run in-process.

`lm_eval` scores the model tunekit loaded (adapters folded, chains included, our dtype rule), wrapped in its
`HFLM` class, so what is measured is exactly the target a user names. Tasks are lm_eval's own names (their data
comes from the hub on the user's machine), the path of a task YAML or a folder of them (lm_eval's include path,
for private and offline tasks), or the tasks tunekit ships in tunekit/assets/tasks (offline, over its own
assets). Names are checked before any model loads; an unknown one is an error with the closest names.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "assets" / "tasks"
ASSETS = SHIPPED_TASKS.parent


def shipped_dataset(asset: str, **_: Any) -> Any:
    """lm_eval `custom_dataset` hook of the shipped tasks: a DatasetDict with one `test` split read from
    tunekit's installed assets (so the tasks run from any directory, offline)."""
    import json

    from datasets import Dataset, DatasetDict

    path = ASSETS / asset
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


@dataclass
class TaskSelection:
    """What `--tasks` named: lm_eval task/group names and the include paths that define the local ones."""

    names: list[str]
    include_paths: list[str] = field(default_factory=list)
    manager: Any = None  # lm_eval TaskManager over the defaults plus include_paths


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise TunekitError("--tasks needs lm-evaluation-harness: pip install 'tunekit[eval]'") from exc


def _quiet_lm_eval() -> None:
    """lm_eval logs every step at INFO and warns that it was handed a loaded model (which is the point)."""
    for name in ("lm_eval", "lm-eval", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task_names_in(manager: Any, folder: Path) -> list[str]:
    from lm_eval.tasks._index import Kind

    folder = folder.resolve()
    names = [name for name, entry in manager.task_index.items()
             if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None
             and folder in Path(entry.yaml_path).resolve().parents]
    return sorted(names)


def select_tasks(spec: str | list[str]) -> TaskSelection:
    """Resolve `--tasks` (comma-separated names, YAML files, folders) to lm_eval names; unknown names are an
    error listing the closest known ones. Nothing is loaded but lm_eval's task index."""
    _require_lm_eval()
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    items = [s.strip() for part in ([spec] if isinstance(spec, str) else spec) for s in part.split(",")]
    items = [s for s in items if s]
    if not items:
        raise TunekitError("--tasks: name at least one task")
    include = [str(SHIPPED_TASKS)]
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            include.append(str(p.resolve()))
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise TunekitError(f"--tasks: task file '{item}' not found")
            include.append(str(p.resolve().parent))
    # lm_eval's own ~15k task YAMLs take seconds to index: only when a name is not a local one
    manager = TaskManager(include_path=include, include_defaults=False)
    local = [i for i in items if Path(i).expanduser().is_dir() or Path(i).suffix in (".yaml", ".yml")]
    if any(i not in manager.all_tasks and not manager.match_tasks([i]) for i in items if i not in local):
        manager = TaskManager(include_path=include)
    names: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = _task_names_in(manager, p)
            if not found:
                raise TunekitError(f"--tasks: folder '{item}' holds no lm_eval task YAML")
            names += found
        elif p.suffix in (".yaml", ".yml"):
            try:
                entry = TaskIndex.entry_from_path(p)
            except Exception as exc:  # YAML syntax errors and the like, reported with the file
                raise TunekitError(f"--tasks: {item}: not a readable task YAML ({exc})") from exc
            if entry is None:
                raise TunekitError(f"--tasks: {item}: a task YAML needs a `task:` (or `group:`) key")
            names.append(entry.name)
        elif item in manager.all_tasks or manager.match_tasks([item]):
            names += [item] if item in manager.all_tasks else manager.match_tasks([item])
        else:
            close = difflib.get_close_matches(item, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TunekitError(f"--tasks: unknown task '{item}'{hint} (names as in `lm_eval ls tasks`, "
                               "a task YAML or a folder of them)")
    return TaskSelection(list(dict.fromkeys(names)), include, manager)


def wrap_model(model: Any, tok: Any, batch_size: int, max_length: int | None = None) -> Any:
    """lm_eval's HFLM around an already loaded model and tokenizer (nothing is reloaded or moved)."""
    from lm_eval.models.huggingface import HFLM

    kwargs = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **kwargs)


def run_tasks(model: Any, tok: Any, selection: TaskSelection, *, num_fewshot: int | None = None,
              limit: int | None = None, batch_size: int = 8, apply_chat_template: bool = False,
              seed: int = 0) -> dict[str, Any]:
    """lm_eval's `simple_evaluate` on the loaded model: its raw results mapping (samples logged)."""
    import lm_eval

    _quiet_lm_eval()
    lm = wrap_model(model, tok, batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=selection.names, num_fewshot=num_fewshot, limit=limit, task_manager=selection.manager,
            apply_chat_template=apply_chat_template, log_samples=True, bootstrap_iters=1000,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise TunekitError(f"--tasks: lm_eval could not read a task's data ({exc}); hub datasets need network "
                           "access, local tasks a data path that exists") from exc
    if results is None:
        raise TunekitError("lm_eval returned no results")
    return results


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'<task>/<metric>' (or '<task>/<metric>/<filter>' for a filter other than none): {value, stderr}}."""
    from tunekit.evaluation.report import metric

    out: dict[str, dict[str, Any]] = {}
    for task, row in results.get("results", {}).items():
        for key, v in row.items():
            if "," not in key or "_stderr," in key or not isinstance(v, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = row.get(f"{name}_stderr,{filt}")
            label = f"{task}/{name}" if filt == "none" else f"{task}/{name}/{filt}"
            out[label] = metric(float(v), stderr if isinstance(stderr, (int, float)) else None)
    return out


def sample_details(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per scored item: task, doc id, target, the model's filtered response, per-item metrics."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            metrics = {m: s[m] for m in s.get("metrics", []) if m in s}
            rows.append({"task": task, "doc_id": s.get("doc_id"), "target": s.get("target"),
                         "response": s.get("filtered_resps"), **metrics})
    return rows


def item_count(results: dict[str, Any]) -> int:
    return sum(int(v.get("effective", 0)) for v in (results.get("n-samples") or {}).values())
