"""The combined rewards plugged into TRL 1.16's real GRPOTrainer (one step on the tiny model)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_grpo_trainer_calls_every_reward(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tunekit.rewards import combine, score

    specs = [
        {"name": "math_answer", "weight": 1.0},
        {"name": "format", "weight": 0.5, "pattern": r".+", "mode": "search"},
        {"name": "length", "weight": 0.25, "max": 2, "slope": 0.5},
        {"name": "code_tests", "weight": 0.1, "timeout": 3},
    ]
    funcs, weights = combine(specs)
    calls: dict[str, dict] = {}

    def recorded(fn):
        def wrapper(**kwargs):
            out = fn(**kwargs)
            calls[fn.__name__] = {"kwargs": kwargs, "out": out}
            return out

        wrapper.__name__ = fn.__name__
        return wrapper

    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "#### 4", "tests": ["assert True"]},
        {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6", "tests": ["assert 1 == 2"]},
    ])
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=1,
        max_completion_length=4, logging_steps=1, report_to=[], bf16=False, gradient_checkpointing=False,
        reward_weights=weights, use_cpu=True, save_strategy="no", seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[recorded(f) for f in funcs], args=args, train_dataset=data,
                          processing_class=tok)
    trainer.train()
    logged = {k: v for row in trainer.state.log_history for k, v in row.items()}
    for name in ("math_answer", "format", "length", "code_tests"):
        assert f"rewards/{name}/mean" in logged, json.dumps(logged)[:2000]
    kwargs = calls["math_answer"]["kwargs"]
    assert {"prompts", "completions", "completion_ids", "answer", "tests", "trainer_state"} <= set(kwargs)
    # Re-score what the trainer passed, outside the trainer: same values, and TRL logged their means.
    again = score(specs, kwargs["prompts"], kwargs["completions"],
                  {"answer": kwargs["answer"], "tests": kwargs["tests"]}, completion_ids=kwargs["completion_ids"])
    for name in ("math_answer", "format", "length", "code_tests"):
        assert list(again.per_reward[name]) == calls[name]["out"]
        assert logged[f"rewards/{name}/mean"] == pytest.approx(sum(calls[name]["out"]) / 4)
    # length: n tokens over max 2 at slope 0.5, floored at -1
    assert calls["length"]["out"] == [max(-0.5 * max(len(ids) - 2, 0), -1.0) for ids in kwargs["completion_ids"]]
