"""`tunekit eval` for every kind of target: what is measured follows what the target is and what is asked.

- `--tasks`: lm-evaluation-harness tasks on the loaded model (harness.py);
- `--judge`: pairwise win rate against `--against`, judged by a model (judge.py);
- a `tunekit rm` run: pairwise accuracy P[r(x, y_c) > r(x, y_r)] and mean margin on preference pairs;
- a `tunekit dpo` or `tunekit kto` run on preference pairs: implicit-reward accuracy with the run's own β, and
  log-prob accuracy;
- a `tunekit orpo` / `tunekit simpo` run: preference accuracy with the method's reference-free reward;
- any other policy on preference pairs: log-prob preference accuracy P[log π(y_c|x) > log π(y_r|x)];
- `--reward NAME` (grpo/ppo runs or any policy, on prompt data): mean reward of greedy answers;
- otherwise: perplexity on assistant tokens and exact match of greedy answers.
Each returns a `Measured`; `report.document` turns it (and the baseline's, with `--against`) into eval.json.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError


@dataclass
class Measured:
    mode: str
    measures: str  # one line: what the numbers are
    metrics: dict[str, dict[str, Any]]
    n: int | None = None
    details: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def run_stage_of(target: str) -> tuple[str | None, dict[str, Any]]:
    """(stage, recipe mapping) of a run directory (or of the run an adapter folder sits in)."""
    from tunekit.config.load import read_yaml_file

    p = Path(target)
    for run in (p, p.parent):
        recipe = run / "recipe.yaml"
        if recipe.is_file():
            data = read_yaml_file(recipe, "run recipe") or {}
            return (data.get("stage", "sft") if isinstance(data, dict) else None), data
    return None, {}


def read_records(data: str, limit: int | None):
    from tunekit.data.sources import read_source
    from tunekit.errors import reading

    with reading(data):
        records = read_source(data)
    records = records[:limit] if limit else records
    if not records:
        raise TunekitError(f"{data}: no records to evaluate")
    return records


def _accuracy(value: float, n: int) -> dict[str, Any]:
    from tunekit.evaluation.report import metric
    from tunekit.evaluation.stats import wilson_interval

    return metric(value, ci=wilson_interval(round(value * n), n))


def _mean(values: list[float]) -> dict[str, Any]:
    from tunekit.evaluation.report import metric
    from tunekit.evaluation.stats import mean_stderr

    return metric(sum(values) / len(values) if values else None, stderr=mean_stderr(values))


def evaluate_data(
    target: str,
    records: list[Any],
    base: str | None = None,
    max_length: int = 1024,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generate: bool = True,
    rewards: list[str] | None = None,
    trust_remote_code: bool = False,
) -> Measured:
    """Measure `target` on data records; the mode follows the target and the data. Model code runs only with
    `trust_remote_code` (the user's command line), never because a run's recipe asks."""
    stage, recipe = run_stage_of(target)
    if stage == "rm":
        from tunekit.data.preference import to_preference
        from tunekit.evaluation.preference import reward_model_accuracy
        from tunekit.rewards.reward_model import load_reward_model

        pairs = [to_preference(r.data, "auto", r.where) for r in records]
        model, tok = load_reward_model(target)
        res = reward_model_accuracy(model, tok, pairs, max_length)
        return Measured("reward_model", "pairwise accuracy P[r(x, y_c) > r(x, y_r)] of a reward model", {
            "pairwise_accuracy": _accuracy(res["pairwise_accuracy"], res["n"]),
            "mean_margin": _mean(res["margins"])}, res["n"])
    if rewards:
        return _reward_eval(target, base, records, rewards, max_new_tokens, batch_size, trust_remote_code)
    if "chosen" in records[0].data and "rejected" in records[0].data:
        return _preference_eval(target, base, records, stage, recipe, max_length, trust_remote_code)
    from tunekit.data.formats import to_messages
    from tunekit.evaluation.score import evaluate
    from tunekit.models.trained import load_any

    conversations = [to_messages(r.data, "auto", r.where) for r in records]
    model, tok = load_any(target, base, trust_remote_code)
    res = evaluate(model, tok, conversations, max_length, max_new_tokens, batch_size, generate)
    from tunekit.evaluation.report import metric

    metrics = {"perplexity": metric(res["perplexity"]), "loss": metric(res["loss"]), "tokens": metric(res["tokens"])}
    if res.get("exact_match") is not None:
        metrics["exact_match"] = _accuracy(res["exact_match"], len(res["answers"]))
    return Measured("perplexity", "perplexity of the reference assistant turns; exact match of greedy answers",
                    metrics, res["n"], res.get("answers"), {"max_new_tokens": max_new_tokens if generate else None})


def _preference_eval(target, base, records, stage, recipe, max_length, trust_remote_code) -> Measured:
    """A DPO or KTO run: implicit-reward accuracy with its own β (and log-prob accuracy); an ORPO/SimPO/CPO run:
    accuracy of its reference-free reward; any other policy: log-prob preference accuracy only (no β was trained,
    so no implicit reward is claimed)."""
    from tunekit.data.preference import to_preference
    from tunekit.models.trained import load_any

    pairs = [to_preference(r.data, "auto", r.where) for r in records]
    recipe = recipe if isinstance(recipe, dict) else {}
    if stage in ("orpo", "simpo"):
        from tunekit.evaluation.preference import reference_free_accuracy

        variant = (recipe.get("simpo") or {}).get("variant", "simpo") if stage == "simpo" else "orpo"
        model, tok = load_any(target, base, trust_remote_code)
        res = reference_free_accuracy(model, tok, pairs, variant != "cpo", max_length)
        return Measured(
            "preference", f"preference accuracy of a {variant} run with its reference-free reward ({res['reward']})",
            {"preference_accuracy": _accuracy(res["preference_accuracy"], res["n"]),
             "mean_reward_margin": _mean(res["reward_margins"])},
            res["n"], settings={"stage": stage, "variant": variant, "reward": res["reward"]})
    if stage not in ("dpo", "kto"):
        from tunekit.evaluation.preference import logprob_accuracy

        model, tok = load_any(target, base, trust_remote_code)
        res = logprob_accuracy(model, tok, pairs, max_length)
        return Measured("preference", "log-prob preference accuracy of a policy: P[log π(y_c|x) > log π(y_r|x)]", {
            "logprob_accuracy": _accuracy(res["logprob_accuracy"], res["n"]),
            "mean_logprob_margin": _mean(res["logprob_margins"])}, res["n"], settings={"stage": stage})
    from tunekit.evaluation.preference import dpo_accuracy
    from tunekit.run.locate import locate

    beta = float((recipe.get(stage) or {}).get("beta", 0.1))
    model, tok = load_any(target, base, trust_remote_code)
    reference = None
    if not hasattr(model, "disable_adapter"):  # full / LoRA-XS / SVFT: the start model, loaded on its own
        loc = locate(target)
        if loc is None or loc.base is None:
            raise TunekitError(f"'{target}' names no base model to compare with; pass --base")
        reference, _ = load_any(base or loc.base.name)
    res = dpo_accuracy(model, tok, pairs, beta, reference, max_length)
    from tunekit.evaluation.report import metric

    return Measured(
        "preference", f"implicit-reward accuracy of a {stage.upper()} run (its own β = {beta:g}) and log-prob "
        "preference accuracy",
        {"implicit_reward_accuracy": _accuracy(res["implicit_reward_accuracy"], res["n"]),
         "logprob_accuracy": _accuracy(res["logprob_accuracy"], res["n"]),
         "mean_logprob_margin": _mean(res["logprob_margins"]),
         "mean_reward_margin": _mean(res["reward_margins"]),
         "chosen_reward": metric(res["chosen_reward"]), "rejected_reward": metric(res["rejected_reward"])},
        res["n"], settings={"stage": stage, "beta": beta})


def prompts_of(records: list[Any]) -> list[Any]:
    """Prompt records (prompt-only, messages, or an alpaca instruction whose output is kept as `reference`)."""
    from tunekit.data.formats import to_messages
    from tunekit.data.preference import PromptRecord, to_prompt

    out = []
    for r in records:
        if isinstance(r.data, dict) and "instruction" in r.data and "prompt" not in r.data:
            msgs = to_messages(r.data, "auto", r.where)
            out.append(PromptRecord(msgs[:-1], {"reference": msgs[-1]["content"]}, r.where))
        else:
            out.append(to_prompt(r.data, "auto", r.where))
    return out


def _reward_eval(target, base, records, rewards, max_new_tokens, batch_size, trust_remote_code) -> Measured:
    from tunekit.generation import sample
    from tunekit.models.trained import load_any
    from tunekit.rewards import RewardSet, score

    prompts = prompts_of(records)
    specs = RewardSet.from_specs([{"name": name} for name in rewards])  # checked here, before the model loads
    model, tok = load_any(target, base, trust_remote_code)
    roll = sample(model, tok, [p.prompt for p in prompts], max_new_tokens=max_new_tokens, temperature=0,
                  batch_size=batch_size)
    columns = {k: [p.columns.get(k) for p in prompts] for k in {k for p in prompts for k in p.columns}}
    scored = score(specs, [p.prompt for p in prompts], roll.texts, columns)
    metrics = {}
    for name, values in scored.per_reward.items():
        metrics[f"rewards/{name}/mean"] = _mean([v for v in values if v is not None])
    metrics["reward"] = _mean([float(x) for x in scored.total])
    details = [{"prompt": p.prompt[-1]["content"], "answer": a,
                "rewards": {k: v[i] for k, v in scored.per_reward.items()}}
               for i, (p, a) in enumerate(zip(prompts, roll.texts))]
    return Measured("reward", f"mean reward of greedy answers ({', '.join(rewards)})", metrics, len(prompts),
                    details, {"max_new_tokens": max_new_tokens})


def evaluate_tasks(target: str, selection: Any, base: str | None = None, num_fewshot: int | None = None,
                   limit: int | None = None, batch_size: int = 8, apply_chat_template: bool = False,
                   trust_remote_code: bool = False) -> Measured:
    """lm_eval tasks on the loaded target (see harness.py)."""
    from tunekit.evaluation import harness
    from tunekit.models.trained import load_any

    model, tok = load_any(target, base, trust_remote_code)
    results = harness.run_tasks(model, tok, selection, num_fewshot=num_fewshot, limit=limit,
                                batch_size=batch_size, apply_chat_template=apply_chat_template)
    del model, tok
    gc.collect()
    settings = {"tasks": selection.names, "num_fewshot": num_fewshot, "limit": limit,
                "apply_chat_template": apply_chat_template,
                "n_shot": results.get("n-shot"), "include_paths": selection.include_paths[1:]}
    return Measured("tasks", "lm-evaluation-harness tasks (value ± stderr as lm_eval reports it)",
                    harness.metrics_of(results), harness.item_count(results), harness.sample_details(results),
                    settings)


def answers_of(target: str, prompts: list[Any], base: str | None, max_new_tokens: int, batch_size: int,
               trust_remote_code: bool = False) -> list[str]:
    """Greedy answers of a model to chat prompts (the model is freed afterwards)."""
    from tunekit.generation import sample
    from tunekit.models.trained import load_any

    model, tok = load_any(target, base, trust_remote_code)
    texts = sample(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0, batch_size=batch_size).texts
    del model, tok  # the next model loads into the memory this one held
    gc.collect()
    return texts


def evaluate_judge(target: str, baseline: str, judge: str, records: list[Any], base: str | None = None,
                   template: str | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                   trust_remote_code: bool = False) -> tuple[Measured, list[dict[str, Any]]]:
    """Win rate of `target` against `baseline` as judged by `judge` (see judge.py): (result, judgements)."""
    from tunekit.evaluation import judge as judging
    from tunekit.models.trained import load_any

    template_name, questions = judging.judge_questions(template)
    prompts = [p.prompt for p in prompts_of(records)]
    mine = answers_of(target, prompts, base, max_new_tokens, batch_size, trust_remote_code)
    theirs = answers_of(baseline, prompts, None, max_new_tokens, batch_size, trust_remote_code)
    jmodel, jtok = load_any(judge, None, trust_remote_code)
    verdicts = judging.judge_answers(jmodel, jtok, prompts, mine, theirs, questions, batch_size)
    del jmodel, jtok
    gc.collect()
    metrics, warnings = judging.summarize(verdicts, [len(a) for a in mine], [len(a) for a in theirs])
    rows = judging.judgement_rows(prompts, mine, theirs, verdicts)
    measured = Measured("judge", f"pairwise win rate judged by {judge} (both orders, ties = ½; lengths in "
                        "characters)", metrics, len(prompts), None,
                        {"judge": judge, "judge_template": template_name, "questions": questions,
                         "max_new_tokens": max_new_tokens}, warnings)
    return measured, rows
