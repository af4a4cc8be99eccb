"""`tunekit ppo` end to end in real subprocesses on a tiny model: the run directory, resume after SIGKILL,
one-line errors with nothing written, every adapter method's reference."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import ROOT, run_cli, write_jsonl
from tests.ppo_helpers import PROMPTS, build, one_thread  # noqa: F401  (one_thread: fixture)


@pytest.fixture(autouse=True)
def one_thread_subprocesses(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest on a shared machine


def recipe(tmp_path, model_dir, **train):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": str(i)} for i, p in
                                                        enumerate(PROMPTS * 3)])
    r = {
        "stage": "ppo",
        "model": {"name": str(model_dir)},
        "data": {"train": str(prompts), "eval_split": 4},
        "adapter": {"method": "lora", "r": 4},
        "ppo": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "epochs": 1,
                "samples_every": 1},
        "rewards": [{"name": "python:tests.ppo_helpers:vowel_reward"}, {"name": "length", "max": 8, "unit": "chars",
                                                                         "weight": 0.5}],
        "train": {"max_steps": 3, "lr": 1e-3, "batch_size": 4, "save_steps": 0, **train},
        "generate": {"samples": 2, "max_new_tokens": 4},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_ppo_writes_a_complete_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    res = run_cli("ppo", recipe(tmp_path, tiny_model_dir), "--output", out)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("recipe.yaml", "run_card.json", "metrics.jsonl", "rollouts.jsonl", "samples.jsonl",
                 "value_head.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    metrics = rows(out / "metrics.jsonl")
    steps = [r for r in metrics if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "response_length", "rewards/vowel_reward/mean", "rewards/length/mean", "rollout_tokens_per_s"):
        assert key in steps[-1], key
    # the logged reward is the weighted sum of the per-reward means
    last = steps[-1]
    assert last["reward"] == pytest.approx(last["rewards/vowel_reward/mean"] + 0.5 * last["rewards/length/mean"],
                                           abs=1e-5)
    evals = [r for r in metrics if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 3]
    card = json.loads((out / "run_card.json").read_text())
    assert card["finished"] and card["global_step"] == 3 and card["ppo"]["reference"] == "adapter off"
    assert card["metrics"]["eval_reward"] == evals[-1]["eval_reward"]
    assert {r["step"] for r in rows(out / "rollouts.jsonl")} == {1, 2, 3}
    answers = rows(out / "eval_answers.jsonl")  # the greedy held-out answers behind eval_reward, before and after
    assert sorted({r["step"] for r in answers}) == [0, 3] and len(answers) == 8
    for step in (0, 3):
        scored = [r["reward"] for r in answers if r["step"] == step]
        assert sum(scored) / 4 == pytest.approx(next(e["eval_reward"] for e in evals if e["step"] == step), abs=1e-5)
    assert all(set(r) >= {"prompt", "answer", "response"} for r in answers)


@pytest.mark.slow
def test_ppo_resume_after_sigkill(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny_model_dir, max_steps=8, save_steps=2, save_total_limit=1)
    slow = yaml.safe_load(path.read_text())  # checkpoint-4 lives two steps (>= 1 s) before save_total_limit drops it
    slow["rewards"][0]["name"] = "python:tests.ppo_helpers:slow_vowel_reward"
    path.write_text(yaml.safe_dump(slow))
    cmd = [sys.executable, "-m", "tunekit", "ppo", str(path), "--output", str(out)]
    log = tmp_path / "first-run.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 900
    # wait for the checkpoint's last file, not its folder: a kill between the two left no complete checkpoint
    while time.time() < deadline and not (partial / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file():
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (partial / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file(), \
        f"no checkpoint before kill (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    assert not (partial / "checkpoints" / "checkpoint-2").exists()  # save_total_limit 1
    res = run_cli("ppo", path, "--output", out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from checkpoint-4" in res.stdout + res.stderr
    steps = [r["step"] for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert steps == list(range(1, 9))  # steps logged before the kill and redone are not duplicated
    assert json.loads((out / "run_card.json").read_text())["global_step"] == 8


@pytest.mark.parametrize("change, message", [
    ({"rewards": []}, "needs `rewards:`"),
    ({"train": {"max_steps": -1}}, "train.max_steps"),
    ({"rewards": [{"name": "reward_model", "path": "/nonexistent/rm"}]}, "does not exist"),
    ({"ppo": {"clip_epz": 0.1}}, "clip_eps"),
    ({"ppo": {"prompts_per_step": 2, "samples_per_prompt": 1, "minibatch_size": 4}}, "minibatch_size"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, change, message):
    path = recipe(tmp_path, tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    for key, value in change.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    res = run_cli("ppo", path, "--output", out)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not out.exists() and not out.with_name("run.partial").exists()


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "milora", "lora_xs", "svft", "none"])
def test_every_adapter_method_starts_at_its_reference(tiny_model_dir, method):
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import load_model
    from tunekit.ppo.models import Reference

    tok, pv, mc = build(tiny_model_dir, method)
    ref = Reference.for_policy(pv.policy, method, load_base=lambda: load_model(mc, tok))
    seq = torch.tensor([tok("Say hello. Hello there!", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(seq)
    with torch.no_grad():
        policy_lp = pv(seq, att, 3, with_values=False).logprobs
    ref_lp = ref.logprobs(seq, att, 3, temperature=1.0)
    assert torch.allclose(policy_lp, ref_lp, atol=1e-3), (policy_lp - ref_lp).abs().max()
    base = load_model(ModelConfig(name=str(tiny_model_dir)), tok)
    base_lp = Reference(base, "none", base).logprobs(seq, att, 3, temperature=1.0)
    assert torch.allclose(ref_lp, base_lp, atol=1e-3)  # the reference is the starting model, not W_res
