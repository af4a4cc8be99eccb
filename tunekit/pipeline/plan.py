"""What a run will do with each stage: cached, run (and why: which key, input file or upstream changed), resume,
or skip (outside --only/--until). Read-only: planning writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.pipeline.fingerprint import (
    FileHashes,
    altered,
    fingerprint,
    input_files,
    placeholders,
    versions,
)
from tunekit.pipeline.resolve import Resolved, artifact_of
from tunekit.pipeline.spec import PipelineSpec

STATE_DIR = ".pipeline"
SKIPPED = "not selected (--only/--until); up to date"
STALE = "not selected (--only/--until); not up to date"


def state_dir(spec: PipelineSpec) -> Path:
    return spec.output / STATE_DIR


def state_file(spec: PipelineSpec, name: str) -> Path:
    return state_dir(spec) / "stages" / f"{name}.json"


def read_state(spec: PipelineSpec, name: str) -> dict[str, Any] | None:
    path = state_file(spec, name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@dataclass
class StagePlan:
    name: str
    command: str
    action: str  # cached | run | resume | skip
    why: str
    fingerprint: str
    resolved: Resolved
    record: dict[str, Any] = field(default_factory=dict)  # what the state file will hold once it finished


def interrupted(spec: PipelineSpec, res: Resolved) -> str | None:
    """A description of an interrupted attempt of this stage that --resume can continue, or None."""
    if res.command == "cai":
        state = res.folder / "cai_state.json"
        if state.is_file() and read_state(spec, res.name) is None:
            return f"{res.folder} (unfinished cai phases)"
        return None
    if res.recipe is None:
        return None
    partial = res.folder.with_name(res.folder.name + ".partial")
    ckpts = sorted(partial.glob("checkpoints/checkpoint-*/trainer_state.json"))
    return f"{partial} ({ckpts[-1].parent.name})" if ckpts else None


def _why_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    from tunekit.run.rundir import changed_keys

    keys = changed_keys(old.get("input", {}), new["input"])
    if keys:
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
        return f"changed: {shown}"
    old_files, new_files = old.get("files", {}), new["files"]
    for path in sorted(set(old_files) | set(new_files)):
        if old_files.get(path) != new_files.get(path):
            return f"input changed: {path}"
    for lib, ver in new["versions"].items():
        if old.get("versions", {}).get(lib) != ver:
            return f"{lib} {old.get('versions', {}).get(lib)} -> {ver}"
    return "fingerprint changed"


def make_plan(spec: PipelineSpec, resolved: dict[str, Resolved], force: list[str] = (), only: list[str] = (),
              until: str | None = None, resume: bool = False, hashes: FileHashes | None = None) -> list[StagePlan]:
    for name in [*force, *only, *([until] if until else [])]:
        if name not in spec.stages:
            import difflib

            close = difflib.get_close_matches(name, list(spec.stages), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TunekitError(f"no stage '{name}' in {spec.path}{hint}; stages: {', '.join(spec.stages)}")
    hashes = hashes or FileHashes()
    libs = versions()
    stage_paths = {str(artifact_of(spec, n)): n for n in spec.stages}
    stage_paths.update({str(spec.output / n): n for n in spec.stages})
    selected = set(spec.order)
    if until:
        selected &= spec.upstream(until)
    if only:
        selected &= set(only)
    forced = spec.downstream(set(force))
    plans: dict[str, StagePlan] = {}
    for name in spec.order:
        res = resolved[name]
        record = {"input": placeholders(res.describe(), stage_paths)["input"], "command": res.command,
                  "files": input_files(res.inputs, hashes),
                  "upstream": {u: plans[u].fingerprint for u in res.needs}, "versions": libs}
        fp = fingerprint(record["input"], record["files"], record["upstream"], libs)
        record["fingerprint"] = fp
        stored = read_state(spec, name)
        rerun_up = [u for u in res.needs if plans[u].action in ("run", "resume")]
        broken = interrupted(spec, res)
        if name not in selected:
            fresh = (stored is not None and stored.get("fingerprint") == fp and not rerun_up
                     and altered(res.folder, stored.get("manifest", {}), hashes) is None)
            action, why = "skip", (SKIPPED if fresh else STALE)
        elif name in force:
            action, why = "run", "forced (--force)"
        elif broken and resume:
            action, why = "resume", f"resumes {broken}"
        elif broken:
            raise TunekitError(f"{spec.where(name)}: stage '{name}' was interrupted: {broken}; pass --resume to "
                               f"continue it, or --force {name} to start it over")
        elif name in forced:
            action, why = "run", f"upstream '{next(u for u in res.needs if u in forced)}' re-runs"
        elif stored is None:
            action, why = "run", "not run yet" if not res.folder.exists() else "no record of a finished run"
        elif rerun_up:
            action, why = "run", f"upstream '{rerun_up[0]}' re-runs"
        elif stored.get("fingerprint") != fp:
            action, why = "run", _why_changed(stored, record)
        else:
            problem = altered(res.folder, stored.get("manifest", {}), hashes)
            action, why = ("run", problem) if problem else ("cached", "up to date")
        plans[name] = StagePlan(name, res.command, action, why, fp, res, record)
    for name in selected:
        for need in spec.upstream(name) - {name}:
            if need not in selected and plans[need].why == STALE:
                raise TunekitError(f"stage '{name}' needs '{need}', which is not finished or not up to date; run "
                                   f"it first (without --only)")
    return [plans[n] for n in spec.order]
