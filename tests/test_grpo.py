"""`tunekit grpo` on a tiny model: runs with registry and user rewards, logs each reward, writes completions,
saves an adapter that reloads in plain PEFT, resumes after SIGKILL; bad reward specs fail before work."""

from __future__ import annotations

import json

import pytest

from tests.helpers import interrupt_after_checkpoint, run_cli, write_jsonl

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a in range(1, 5) for b in range(1, 4)]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", PROMPTS)


def _sets(model_dir, data, *extra):
    base = [f"model.name={model_dir}", f"data.train={data}", "train.max_steps=2", "train.batch_size=4",
            "train.lr=1e-3", "train.save_steps=0", "grpo.num_generations=2", "grpo.max_completion_length=6",
            "grpo.log_completions_steps=1", "generate.samples=2", "generate.max_new_tokens=4",
            "rewards=[{name: math_answer, weight: 1.0}, {name: 'python:tests.helpers:share_of_e', weight: 0.5}]",
            *extra]
    return [a for s in base for a in ("--set", s)]


def test_grpo_run_logs_each_reward_and_reloads(tmp_path, tiny_model_dir, prompt_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grpo"
    res = run_cli("grpo", *_sets(tiny_model_dir, prompt_file), "--output", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"rewards/math_answer/mean", "rewards/share_of_e/mean"} <= keys
    done = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {d["step"] for d in done} == {1, 2} and set(done[0]["rewards"]) == {"math_answer", "share_of_e"}
    assert json.loads((out / "run_card.json").read_text())["stage"] == "grpo"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    ev = run_cli("eval", out, "--data", prompt_file, "--reward", "math_answer", "--max-new-tokens", "4")
    assert ev.returncode == 0, ev.stderr
    assert "rewards/math_answer/mean" in json.loads(ev.stdout.strip().splitlines()[-1])["metrics"]


@pytest.mark.parametrize("bad, message", [
    ("rewards=[]", "needs `rewards:`"),
    ("rewards=[{name: math_answr}]", "did you mean 'math_answer'"),
    ("grpo.num_generations=3", "must divide"),
    ("grpo.loss_type=grpoo", "did you mean 'grpo'"),
    ("rewards=[{name: math_answer, column: solution}]", "reads the column 'solution'"),
])
def test_bad_grpo_recipes_fail_before_work(tmp_path, tiny_model_dir, prompt_file, bad, message):
    res = run_cli("grpo", *_sets(tiny_model_dir, prompt_file, bad), "--output", tmp_path / "o")
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_grpo_resume_after_sigkill(tmp_path, tiny_model_dir, prompt_file):
    out = tmp_path / "run"
    sets = _sets(tiny_model_dir, prompt_file, "train.max_steps=40", "train.save_steps=2",
                 "train.save_total_limit=1", "generate.samples=0")
    step = interrupt_after_checkpoint(["grpo", *sets], out)
    res = run_cli("grpo", *sets, "--output", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{step}" in res.stderr
    assert json.loads((out / "run_card.json").read_text())["global_step"] == 40
