"""One entry point for every `tunekit eval` mode (the CLI and the pipeline's eval stage call it): validate the
request before any model loads, run the mode on the target (and the baseline), print the table, write eval.json
through the output guard, return the document (report.py describes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError


@dataclass
class EvalRequest:
    target: str
    data: str | None = None
    tasks: str | None = None
    against: str | None = None
    judge: str | None = None
    judge_template: str | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    base: str | None = None
    max_length: int = 1024
    max_new_tokens: int = 64
    limit: int | None = None
    batch_size: int = 8
    generate: bool = True
    rewards: list[str] = field(default_factory=list)
    output: Path | None = None
    overwrite: bool = False
    trust_remote_code: bool = False

    @property
    def mode(self) -> str:
        return "tasks" if self.tasks is not None else "judge" if self.judge is not None else "data"


def judgements_path(output: Path) -> Path:
    """judgements.jsonl beside eval.json (or `<stem>.judgements.jsonl` beside another name)."""
    output = Path(output)
    return output.with_name("judgements.jsonl" if output.name == "eval.json" else f"{output.stem}.judgements.jsonl")


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Validate, measure, print, write; returns the eval.json document (with details)."""
    from tunekit.evaluation import report
    from tunekit.evaluation.runs import evaluate_data, evaluate_judge, evaluate_tasks, read_records
    from tunekit.run import guard

    mode = req.mode
    check_options(req)
    # everything the user named is checked before the output guard and any model
    selection = None
    records = None
    if mode == "tasks":
        from tunekit.evaluation.harness import select_tasks

        selection = select_tasks(req.tasks)
    else:
        records = read_records(req.data, req.limit)
    if mode == "judge":
        from tunekit.evaluation.judge import judge_questions

        judge_questions(req.judge_template)
    check_rewards(req.rewards)
    inputs = [req.target, req.data, req.base, req.against, req.judge, req.judge_template]
    outputs = [req.output] + ([judgements_path(req.output)] if req.output is not None and mode == "judge" else [])
    held = [guard.acquire(o, inputs, req.overwrite) for o in outputs if o is not None]
    try:
        rows = None
        theirs = None
        if mode == "tasks":
            args = (selection, req.num_fewshot, req.limit, req.batch_size, req.apply_chat_template)
            mine = evaluate_tasks(req.target, args[0], req.base, *args[1:], req.trust_remote_code)
            if req.against:
                theirs = evaluate_tasks(req.against, args[0], None, *args[1:], req.trust_remote_code)
        elif mode == "judge":
            mine, rows = evaluate_judge(req.target, req.against, req.judge, records, req.base, req.judge_template,
                                        req.max_new_tokens, req.batch_size, req.trust_remote_code)
        else:
            kw = dict(max_length=req.max_length, max_new_tokens=req.max_new_tokens, batch_size=req.batch_size,
                      generate=req.generate, rewards=req.rewards, trust_remote_code=req.trust_remote_code)
            mine = evaluate_data(req.target, records, req.base, **kw)
            if req.against:
                theirs = evaluate_data(req.against, records, None, **kw)
        details = mine.details
        if theirs is not None and theirs.details is not None and details is not None:
            details = {"target": details, "baseline": theirs.details}
        doc = report.document(mine.mode, mine.measures, req.target, mine.metrics, mine.n, req.against,
                              theirs.metrics if theirs is not None else None,
                              {**mine.settings, **({"data": req.data} if req.data else {})}, details)
        if mine.warnings:
            doc["warnings"] = mine.warnings
        report.print_table(doc)
        if mine.warnings:
            from tunekit.console import console

            for w in mine.warnings:
                console.print(f"[yellow]warning:[/] {w}")
        if req.output is not None:
            if rows is not None:
                report.write_jsonl(rows, judgements_path(req.output), req.overwrite, inputs)
            report.write(doc, req.output, req.overwrite, inputs)
        return doc
    finally:
        for h in held:
            h.release()


def check_rewards(names: list[str]) -> None:
    """Every --reward name builds as the run will build it (typo, empty, a reward that needs parameters, a user
    function that does not import), before any work."""
    if not names:
        return
    from tunekit.rewards.registry import RewardSet

    for name in names:
        if not name.strip():
            raise TunekitError("--reward: empty name (e.g. --reward math_answer)")
    try:
        RewardSet.from_specs([{"name": name} for name in names])
    except TunekitError as exc:
        raise TunekitError(f"--reward: {str(exc).split(': ', 1)[-1]}") from None


def check_options(req: EvalRequest) -> None:
    """Options that do not fit the mode are errors, not silently ignored (value ranges are the CLI's)."""
    mode, data, against, reward, no_generate = req.mode, req.data, req.against, req.rewards, not req.generate
    num_fewshot, apply_chat_template, judge_template = req.num_fewshot, req.apply_chat_template, req.judge_template
    if mode == "tasks":
        for flag, given in (("--data", data), ("--reward", reward), ("--no-generate", no_generate),
                            ("--judge", req.judge), ("--judge-template", judge_template)):
            if given:
                raise TunekitError(f"{flag}: no effect with --tasks (the tasks bring their own data and metrics)")
        return
    for flag, given in (("--num-fewshot", num_fewshot is not None), ("--apply-chat-template", apply_chat_template)):
        if given:
            raise TunekitError(f"{flag}: only with --tasks")
    if mode == "judge":
        if not against:
            raise TunekitError("--judge: needs --against BASELINE (the model the target is judged against)")
        if not data:
            raise TunekitError("--judge: needs --data PROMPTS (held-out prompts both models answer)")
        for flag, given in (("--reward", reward), ("--no-generate", no_generate)):
            if given:
                raise TunekitError(f"{flag}: no effect with --judge")
        return
    if judge_template:
        raise TunekitError("--judge-template: only with --judge")
    if reward and no_generate:
        raise TunekitError("--reward: no effect with --no-generate (rewards score generated answers)")
    if not data:
        raise TunekitError("--data: required (or --tasks NAMES for benchmarks)")
