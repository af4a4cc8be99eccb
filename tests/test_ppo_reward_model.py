"""PPO against a reward model trained by `tunekit rm`, starting from a `tunekit sft` run (the chain
sft → rm → ppo on a tiny model): the RM's score of the policy's samples rises; the CLI run chains from the sft
run and can start a separate value model from the reward model."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from tests.helpers import QA, run_cli, write_jsonl
from tests.ppo_helpers import PROMPTS, build, one_thread  # noqa: F401  (one_thread: fixture)


def _strings(alphabet: str, rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(6, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """(sft run, rm run): the rm prefers vowel-rich answers to consonant-rich ones."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = tmp_path_factory.mktemp("chain")
    rng = random.Random(0)
    pairs = [{"prompt": p, "chosen": c, "rejected": r}
             for p, c, r in zip(PROMPTS * 10, _strings("aeiou e", rng, 40), _strings("xkzqtv t", rng, 40))]
    prefs = write_jsonl(tmp / "pairs.jsonl", pairs)
    qa = write_jsonl(tmp / "qa.jsonl", QA)
    common = [f"model.name={tiny_model_dir}", "adapter.r=4", "train.save_steps=0", "generate.samples=0"]
    sft, rm = tmp / "sft", tmp / "rm"
    res = run_cli("sft", *[a for s in [f"data.train={qa}", "train.max_steps=2", *common] for a in ("--set", s)],
                  "--output", sft)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("rm", *[a for s in [f"data.train={prefs}", "data.eval_split=8", "train.max_steps=40",
                                      "train.lr=5e-3", "train.batch_size=8", *common] for a in ("--set", s)],
                  "--output", rm)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((rm / "run_card.json").read_text())["metrics"]["eval_accuracy"] >= 0.75
    return sft, rm


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score(runs, tiny_model_dir):
    from tunekit.generation import sample
    from tunekit.ppo.config import PPOConfig
    from tunekit.ppo.models import Reference
    from tunekit.ppo.trainer import PPOTrainer
    from tunekit.rewards import RewardSet

    _, rm = runs
    rewards = RewardSet.from_specs([{"name": "reward_model", "path": str(rm)}])

    def rm_score(prompts, completions, *unused):
        return rewards.score(prompts, completions).total

    tok, pv, _ = build(tiny_model_dir, "none")

    def held_out() -> float:
        r = sample(pv.policy, tok, PROMPTS, max_new_tokens=6, temperature=1.0, num_samples=16, batch_size=64, seed=7)
        return float(rewards.score([PROMPTS[i] for i in r.prompt_index], r.texts).total.mean())

    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=8, max_new_tokens=6, epochs=2, minibatch_size=16,
                    kl_coef=0.05, whiten_rewards=True)
    trainer = PPOTrainer(pv, Reference.for_policy(pv.policy, "none"), tok, PROMPTS, rm_score, cfg,
                         steps=25, lr=1e-3, seed=0, forward_batch=16)
    before = held_out()
    rows = trainer.train()
    after = held_out()
    assert after > before, (before, after)
    assert max(r["kl"] for r in rows) < 12.0


@pytest.mark.slow
def test_ppo_cli_chains_from_the_sft_run_with_a_value_model_from_the_rm(runs, tmp_path):
    sft, rm = runs
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2])
    recipe = {
        "stage": "ppo", "model": {"name": str(sft)}, "data": {"train": str(prompts), "eval_split": 2},
        "adapter": {"method": "lora", "r": 4},
        "ppo": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "epochs": 1,
                "value_model": "separate", "value_model_name": str(rm)},
        "rewards": [{"name": "reward_model", "path": str(rm)}],
        "train": {"max_steps": 2, "lr": 1e-3, "save_steps": 0}, "generate": {"samples": 0},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ppo"
    res = run_cli("ppo", path, "--output", out)
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((out / "run_card.json").read_text())
    assert [link["path"] for link in card["chained_from"]] == [str(sft.resolve())]  # the sft adapter folded in
    assert card["ppo"]["value_model"] == "separate"
    assert (out / "value_model" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    # the value head started from the reward model's score head
    from safetensors.torch import load_file

    head = load_file(str(out / "value_head.safetensors"))["summary.weight"]
    assert head.abs().sum() > 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["value_loss"])) for r in steps)
