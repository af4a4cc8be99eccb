"""`tunekit eval` for every kind of target: what is measured follows what the target is.

- a `tunekit rm` run: pairwise accuracy P[r(x, y_c) > r(x, y_r)] and mean margin on preference pairs;
- a `tunekit dpo` run (or any policy, given preference data): implicit-reward preference accuracy;
- `--reward NAME` (grpo/ppo runs or any policy, on prompt data): mean reward of greedy answers;
- otherwise: perplexity on assistant tokens and exact match of greedy answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError


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


def _records(data: str, limit: int | None):
    from tunekit.data.sources import read_source
    from tunekit.errors import reading

    with reading(data):
        records = read_source(data)
    records = records[:limit] if limit else records
    if not records:
        raise TunekitError(f"{data}: no records to evaluate")
    return records


def evaluate_target(
    target: str,
    data: str,
    base: str | None = None,
    limit: int | None = None,
    max_length: int = 1024,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generate: bool = True,
    rewards: list[str] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """One result mapping for `tunekit eval`; the `answers` key (if any) holds per-record details. Model code
    runs only with `trust_remote_code` (the user's command line), never because a run's recipe asks."""
    stage, recipe = run_stage_of(target)
    records = _records(data, limit)
    if stage == "rm":
        from tunekit.data.preference import to_preference
        from tunekit.evaluation.preference import reward_model_accuracy
        from tunekit.rewards.reward_model import load_reward_model

        pairs = [to_preference(r.data, "auto", r.where) for r in records]
        model, tok = load_reward_model(target)
        return {"stage": "rm", **reward_model_accuracy(model, tok, pairs, max_length)}
    if rewards:
        return _reward_eval(target, base, records, rewards, max_new_tokens, batch_size)
    if "chosen" in records[0].data and "rejected" in records[0].data:
        if stage is None:  # a plain model: how often it finds the chosen answer likelier
            from tunekit.data.preference import to_preference
            from tunekit.evaluation.preference import logprob_accuracy
            from tunekit.models.trained import load_any

            model, tok = load_any(target, base, trust_remote_code)
            pairs = [to_preference(r.data, "auto", r.where) for r in records]
            return logprob_accuracy(model, tok, pairs, max_length)
        return _dpo_eval(target, base, records, recipe, max_length)
    from tunekit.data.formats import to_messages
    from tunekit.evaluation.score import evaluate
    from tunekit.models.trained import load_any

    conversations = [to_messages(r.data, "auto", r.where) for r in records]
    model, tok = load_any(target, base, trust_remote_code)
    return evaluate(model, tok, conversations, max_length, max_new_tokens, batch_size, generate)


def _dpo_eval(target: str, base: str | None, records: list[Any], recipe: dict[str, Any], max_length: int):
    from tunekit.data.preference import to_preference
    from tunekit.evaluation.preference import dpo_accuracy
    from tunekit.models.trained import load_any
    from tunekit.run.locate import locate

    pairs = [to_preference(r.data, "auto", r.where) for r in records]
    beta = float((recipe.get("dpo") or {}).get("beta", 0.1))
    model, tok = load_any(target, base)
    reference = None
    if not hasattr(model, "disable_adapter"):  # full / LoRA-XS / SVFT: the start model, loaded on its own
        loc = locate(target)
        if loc is None or loc.base is None:
            raise TunekitError(f"'{target}' names no base model to compare with; pass --base")
        reference, _ = load_any(base or loc.base.name)
    result = dpo_accuracy(model, tok, pairs, beta, reference, max_length)
    return {"stage": "dpo", "beta": beta, **result}


def _reward_eval(target, base, records, rewards, max_new_tokens, batch_size) -> dict[str, Any]:
    from tunekit.data.preference import to_prompt
    from tunekit.generation import sample
    from tunekit.models.trained import load_any
    from tunekit.rewards import RewardSet, score

    prompts = [to_prompt(r.data, "auto", r.where) for r in records]
    model, tok = load_any(target, base)
    roll = sample(model, tok, [p.prompt for p in prompts], max_new_tokens=max_new_tokens, temperature=0,
                  batch_size=batch_size)
    columns = {k: [p.columns.get(k) for p in prompts] for k in {k for p in prompts for k in p.columns}}
    specs = RewardSet.from_specs([{"name": name} for name in rewards])
    scored = score(specs, [p.prompt for p in prompts], roll.texts, columns)
    result: dict[str, Any] = {"n": len(prompts), **scored.means()}
    result["answers"] = [{"prompt": p.prompt[-1]["content"], "answer": a} for p, a in zip(prompts, roll.texts)]
    return result
