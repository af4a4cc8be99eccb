"""The pipeline file: `output`, `defaults`, `stages` (name → command + recipe/options), read with line numbers.

    output: runs/assistant
    defaults: {model: {name: smollm2-135m}}
    stages:
      sft:    {command: sft, recipe: recipes/sft-lora-demo.yaml}
      dpo:    {command: dpo, from: sft, recipe: recipes/dpo-demo.yaml, set: {dpo.beta: 0.1}}
      merged: {command: merge, from: dpo}

Stages form a DAG through `from:` and `{stage: NAME}` references; cycles and unknown names are one-line errors
naming the file and line. Relative paths resolve against the pipeline file's folder (tunekit.paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from tunekit.config.schema import Stage
from tunekit.errors import TunekitError

#: every training command (the recipe schema's stages: sft, rm, dpo, grpo, ppo, cai, kto, orpo, simpo, rloo, distill)
TRAINING_COMMANDS: tuple[str, ...] = get_args(Stage)
COMMANDS = (*TRAINING_COMMANDS, "merge", "quantize", "eval")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_KEYS = ("output", "defaults", "stages")
COMMON_KEYS = ("command", "from", "recipe", "set")
#: the options each non-training command takes as stage keys (its CLI options, spelled with underscores)
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "merge": ("config", "base", "dtype", "shard_size", "seed"),
    "quantize": ("format", "type", "verify", "eval_text", "calibration", "samples", "group_size",
                 "embedding_type"),
    "eval": ("targets", "data", "base", "limit", "max_length", "max_new_tokens", "batch_size", "generate",
             "reward", "tasks", "num_fewshot", "apply_chat_template", "against", "judge", "judge_template",
             "trust_remote_code"),
}
#: eval stage keys that name a model: a target, the baseline, the judge (a stage name, a path or a model name)
EVAL_MODEL_KEYS = ("against", "judge")


@dataclass
class StageSpec:
    """One stage as written in the pipeline file."""

    name: str
    command: str
    body: dict[str, Any]  # every key of the stage except command/from
    line: int
    lines: dict[str, int] = field(default_factory=dict)  # key (dotted inside the stage) -> line
    source: str | None = None  # `from:`
    needs: list[str] = field(default_factory=list)  # every upstream stage (from: and {stage: X} references)


@dataclass
class PipelineSpec:
    path: Path
    output: Path
    defaults: dict[str, Any]
    stages: dict[str, StageSpec]
    order: list[str]  # topological, file order among independent stages

    def where(self, stage: str, key: str | None = None) -> str:
        """`pipeline.yaml:12` for a stage (or one of its keys)."""
        s = self.stages[stage]
        line = s.lines.get(key, s.line) if key else s.line
        return f"{self.path}:{line}"

    def fail(self, stage: str, message: str, key: str | None = None) -> TunekitError:
        return TunekitError(f"{self.where(stage, key)}: stage '{stage}': {message}")

    def downstream(self, names: set[str]) -> set[str]:
        """`names` and every stage that depends on one of them."""
        out = set(names)
        for name in self.order:
            if any(n in out for n in self.stages[name].needs):
                out.add(name)
        return out

    def upstream(self, name: str) -> set[str]:
        """`name` and every stage it depends on."""
        out, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.stages[n].needs)
        return out


def stage_refs(value: Any) -> list[str]:
    """Stage names referenced as `{stage: NAME}` anywhere inside `value`."""
    if isinstance(value, dict):
        if set(value) == {"stage"} and isinstance(value["stage"], str):
            return [value["stage"]]
        return [r for v in value.values() for r in stage_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in stage_refs(v)]
    return []


def read_pipeline(path: str | Path, output: str | Path | None = None) -> PipelineSpec:
    """Parse and check the pipeline file's shape (not yet each stage's recipe: see resolve.py)."""
    import difflib

    from tunekit.config.load import yaml_with_lines

    path = Path(path)
    data, lines = yaml_with_lines(path, "pipeline")
    if not isinstance(data, dict):
        raise TunekitError(f"{path}: a pipeline is a mapping with `output`, `defaults` and `stages`")
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TunekitError(f"{path}:{lines.get(str(key), 1)}: unknown key '{key}'{hint}; valid: "
                               f"{', '.join(TOP_KEYS)}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise TunekitError(f"{path}:{lines.get('stages', 1)}: `stages:` must map stage names to stages, "
                           "e.g. stages: {sft: {command: sft, recipe: recipes/sft-lora-demo.yaml}}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise TunekitError(f"{path}:{lines.get('defaults', 1)}: `defaults:` must map recipe sections to keys, "
                           "e.g. defaults: {model: {name: smollm2-135m}}")
    out_value = output if output is not None else data.get("output")
    if out_value is None:
        out_value = Path("runs") / path.stem
    elif not isinstance(out_value, (str, Path)) or not str(out_value):
        raise TunekitError(f"{path}:{lines.get('output', 1)}: `output:` must be a folder path")
    out_path = Path(str(out_value)).expanduser()  # like a recipe's `output`: relative to the working directory

    stages: dict[str, StageSpec] = {}
    for name, body in stages_raw.items():
        line = lines.get(f"stages.{name}", 1)
        where = f"{path}:{line}: stage '{name}'"
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            raise TunekitError(f"{path}:{line}: stage name {name!r}: use letters, digits, '-', '_' and '.'")
        if not isinstance(body, dict):
            raise TunekitError(f"{where}: expected a mapping with `command:` (one of {', '.join(COMMANDS)})")
        command = body.get("command")
        if command not in COMMANDS:
            close = difflib.get_close_matches(str(command), COMMANDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            sub = f"stages.{name}.command"
            raise TunekitError(f"{path}:{lines.get(sub, line)}: stage '{name}': "
                               + (f"unknown command '{command}'{hint}; valid: {', '.join(COMMANDS)}" if command
                                  else f"missing `command:` (one of {', '.join(COMMANDS)})"))
        stage_lines = {k[len(f"stages.{name}."):]: v for k, v in lines.items() if k.startswith(f"stages.{name}.")}
        source = body.get("from")
        if source is not None and not isinstance(source, str):
            raise TunekitError(f"{path}:{stage_lines.get('from', line)}: stage '{name}': `from:` names one stage")
        rest = {k: v for k, v in body.items() if k not in ("command", "from")}
        spec = StageSpec(name, command, rest, line, stage_lines, source)
        spec.needs = list(dict.fromkeys(([source] if source else []) + stage_refs(rest)))
        stages[name] = spec
    for spec in stages.values():
        spec.needs = list(dict.fromkeys(spec.needs + [t for t in eval_models(spec) if t in stages]))
        for need in spec.needs:
            if need not in stages:
                key = "from" if need == spec.source else None
                close = difflib.get_close_matches(need, list(stages), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise TunekitError(f"{path}:{spec.lines.get(key, spec.line) if key else spec.line}: stage "
                                   f"'{spec.name}': unknown stage '{need}'{hint}; stages: {', '.join(stages)}")
            if need == spec.name:
                raise TunekitError(f"{path}:{spec.line}: stage '{spec.name}': refers to itself")
    order = _topological(path, stages)
    return PipelineSpec(path, out_path, defaults, stages, order)


def eval_targets(spec: StageSpec) -> list[str]:
    """An eval stage's `targets:` entries that are strings (stage names, paths or model names)."""
    if spec.command != "eval":
        return []
    targets = _eval_options(spec).get("targets")
    if isinstance(targets, str):
        targets = [targets]
    return [t for t in targets if isinstance(t, str)] if isinstance(targets, list) else []


def eval_models(spec: StageSpec) -> list[str]:
    """Every model an eval stage names as a string: its targets, then `against:` and `judge:`."""
    if spec.command != "eval":
        return []
    options = _eval_options(spec)
    named = [options.get(key) for key in EVAL_MODEL_KEYS]
    return eval_targets(spec) + [m for m in named if isinstance(m, str)]


def _eval_options(spec: StageSpec) -> dict[str, Any]:
    """An eval stage's keys with its `set:` applied (as resolve.py reads them)."""
    extra = spec.body.get("set")
    return {**spec.body, **extra} if isinstance(extra, dict) else spec.body


def _topological(path: Path, stages: dict[str, StageSpec]) -> list[str]:
    """Stages in dependency order (file order where free); a cycle is an error naming it and its first line."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            first = stages[cycle[0]]
            raise TunekitError(f"{path}:{first.line}: stage '{first.name}': a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for need in stages[name].needs:
            visit(need, trail + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order
