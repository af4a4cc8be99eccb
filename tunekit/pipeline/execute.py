"""Run a planned pipeline: each stage in-process through the same function its command calls, under one lock.

A stage's stored record (fingerprint + output manifest) is removed before it starts and written only once it
finished, so a kill at any point leaves either a finished, recorded stage or one that re-runs (or, with a
checkpoint, resumes with --resume). OUT/pipeline.json and OUT/report.md are rewritten after every stage.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from tunekit.console import console
from tunekit.errors import TunekitError
from tunekit.pipeline.fingerprint import FileHashes, manifest
from tunekit.pipeline.plan import StagePlan, state_dir, state_file
from tunekit.pipeline.report import write_json, write_report
from tunekit.pipeline.resolve import Resolved
from tunekit.pipeline.spec import PipelineSpec


def check_output_folder(spec: PipelineSpec, overwrite: bool) -> None:
    """OUT is either new, or a pipeline output (it holds .pipeline/); anything else needs --overwrite."""
    from tunekit.run import guard

    out = spec.output
    guard.check_overlap(out, [spec.path])
    if out.exists() and not (out / ".pipeline").is_dir():
        if not out.is_dir():
            raise TunekitError(f"output '{out}' is a file; a pipeline writes a folder")
        if any(out.iterdir()) and not overwrite:
            raise TunekitError(f"output '{out}' exists and is not a pipeline output; pass --overwrite to run into "
                               "it (its stage folders are replaced)")
    guard.check_writable(out / "x")


def run_pipeline(spec: PipelineSpec, plans: list[StagePlan], hashes: FileHashes) -> dict[str, Any]:
    """Execute `plans` in order; returns the pipeline record (also OUT/pipeline.json)."""

    record: dict[str, Any] = {"pipeline": str(spec.path), "output": str(spec.output),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    for p in plans:
        record["stages"][p.name] = {"command": p.command, "status": p.action if p.action != "run" else "pending",
                                    "why": p.why, "fingerprint": p.fingerprint, "needs": p.resolved.needs,
                                    "artifact": str(p.resolved.artifact), "seconds": None}
    state_dir(spec).mkdir(parents=True, exist_ok=True)
    try:
        for p in plans:
            entry = record["stages"][p.name]
            if p.action in ("cached", "skip"):
                stored = json.loads(state_file(spec, p.name).read_text()) if p.action == "cached" else {}
                entry["seconds_when_run"] = stored.get("seconds")
                continue
            state_file(spec, p.name).unlink(missing_ok=True)  # not finished until recorded again
            console.rule(f"stage {p.name} ({p.command}): {p.why}")
            entry["status"] = "running"
            write_json(spec.output / "pipeline.json", record)
            started = time.perf_counter()
            try:
                run_stage(p.resolved, resume=p.action == "resume")
            except KeyboardInterrupt:
                entry.update(status="interrupted", seconds=round(time.perf_counter() - started, 2))
                raise
            except BaseException as exc:
                entry.update(status="failed", seconds=round(time.perf_counter() - started, 2),
                             error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                raise
            finally:
                gc.collect()
            seconds = round(time.perf_counter() - started, 2)
            entry.update(status="ran", seconds=seconds)
            stored = {**p.record, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "manifest": manifest(p.resolved.folder, hashes)}
            write_json(state_file(spec, p.name), stored)
            hashes.save()
    finally:
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        hashes.save()
        write_report(spec, record)
    return record


def run_stage(res: Resolved, resume: bool = False) -> None:
    """One stage through its command's own function (what `tunekit <command>` calls)."""
    if res.recipe is not None:
        if res.command == "cai":
            from tunekit.stages.cai import run_cai

            run_cai(res.recipe, phase="all", overwrite=not resume, resume=resume)
            return
        import importlib

        from tunekit.cli.stage import STAGES

        module, fn = STAGES[res.command][1].split(":")
        getattr(importlib.import_module(module), fn)(res.recipe, overwrite=True, resume=resume)
        return
    {"merge": _merge, "quantize": _quantize, "eval": _eval}[res.command](res)


def _merge(res: Resolved) -> None:
    o = res.options
    common = dict(dtype=o.get("dtype"), overwrite=True, shard_size=o.get("shard_size", "5GB"))
    if "adapter" in o:
        from tunekit.merge.adapters import merge_adapter

        merge_adapter(o.get("base"), o["adapter"], res.folder, **common)
        return
    from tunekit.merge.config import load_config
    from tunekit.merge.engine import merge_models

    config = o["config"]
    if isinstance(config, dict):
        import tempfile

        import yaml

        with tempfile.TemporaryDirectory(prefix="tunekit-merge-config-") as td:
            path = Path(td) / "merge.yml"
            path.write_text(yaml.safe_dump(config))
            cfg = load_config(path)
    else:
        cfg = load_config(config)
    merge_models(cfg, res.folder, seed=o.get("seed", 0), **common)


def _staged(res: Resolved):
    """A fresh staging folder for a stage that writes several files; committed to OUT/<stage> when complete."""
    from tunekit.run.atomic import remove

    work = res.folder.with_name(res.folder.name + ".partial")
    if work.exists():
        remove(work)
    work.mkdir(parents=True)
    return work


def _quantize(res: Resolved) -> None:
    from tunekit.quantize.api import quantize
    from tunekit.quantize.verify import print_table
    from tunekit.run.atomic import commit

    o = res.options
    work = _staged(res)
    target = work / res.artifact.relative_to(res.folder)
    report = quantize(o["source"], o["format"], target, qtype=o["type"], calibration=o.get("calibration"),
                      samples=o.get("samples", 128), verify=bool(o.get("verify", False)), overwrite=True,
                      eval_text=o.get("eval_text"), group_size=o.get("group_size", 128),
                      embedding_type=o.get("embedding_type"))
    if report.get("verify"):
        print_table(report)
    commit(work, res.folder)


def _eval(res: Resolved) -> None:
    """`tunekit eval` on each target (`run_eval`, the command's own entry point): OUT/<stage>/<target>.json
    (with judgements beside it for a judge), and eval.json with every target's result less its details."""
    from tunekit.evaluation.command import run_eval
    from tunekit.pipeline.resolve import eval_request
    from tunekit.run.atomic import commit

    o = res.options
    work = _staged(res)
    summary: dict[str, Any] = {}
    for key in ("data", "tasks"):
        if o.get(key) is not None:
            summary[key] = o[key]
    summary.update(res.labels)  # against / judge, as the pipeline names them
    summary["targets"] = {}
    for name, path in o["targets"].items():
        console.print(f"eval: {name}")
        safe = name.replace("/", "_")
        doc = run_eval(eval_request(o, path, work / f"{safe}.json"))
        summary["targets"][name] = {k: v for k, v in doc.items() if k not in ("answers", "details")}
        gc.collect()
    write_json(work / "eval.json", summary)
    commit(work, res.folder)
