"""`model.dtype: auto`: a bf16 checkpoint under an adapter trains with a bf16 frozen base and fp32 adapter weights
on a CPU with native bf16 (AMX / AVX512-BF16); full fine-tuning, fp32 checkpoints and explicit dtypes stay as they
were. Real loads of a tiny Llama stored in bf16, and real `tunekit sft` / `tunekit ppo` runs on it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.config import load_recipe
from tunekit.models.load import cpu_has_native_bf16, resolve_dtype, stored_dtype

native = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16)")


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny test model, stored in bf16 (as most hub checkpoints and our embedded SmolLM2 are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bf16") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _model_cfg(folder, *extra):
    return load_recipe(None, [f"model.name={folder}", *extra]).model


def test_stored_dtype_is_read_from_config(tiny_model_dir, bf16_model_dir):
    assert stored_dtype(_model_cfg(tiny_model_dir)) == "float32"
    assert stored_dtype(_model_cfg(bf16_model_dir)) == "bfloat16"


def test_auto_keeps_fp32_where_weights_train_or_nothing_is_saved(tiny_model_dir, bf16_model_dir):
    assert resolve_dtype(_model_cfg(bf16_model_dir), frozen=False) == torch.float32  # full fine-tuning
    assert resolve_dtype(_model_cfg(tiny_model_dir), frozen=True) == torch.float32  # fp32 checkpoint: no downcast
    assert resolve_dtype(_model_cfg(bf16_model_dir, "model.dtype=float32"), frozen=True) == torch.float32
    assert resolve_dtype(_model_cfg(tiny_model_dir, "model.dtype=bfloat16"), frozen=False) == torch.bfloat16


@native
def test_auto_picks_bf16_for_a_frozen_bf16_base(bf16_model_dir):
    assert resolve_dtype(_model_cfg(bf16_model_dir), frozen=True) == torch.bfloat16


@native
def test_lora_on_bf16_base_keeps_adapter_weights_fp32(bf16_model_dir):
    from tunekit.stages.common import load_trainable

    recipe = load_recipe(None, [f"model.name={bf16_model_dir}", "adapter.method=lora", "adapter.r=4"])
    _, model = load_trainable(recipe)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


@native
@pytest.mark.slow
def test_sft_and_ppo_run_on_bf16_base(tmp_path, bf16_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "sft"
    res = run_cli("sft", "--set", f"model.name={bf16_model_dir}", "--set", f"data.train={data}", "--set",
                  "train.max_steps=3", "--set", "train.batch_size=2", "--set", "train.lr=1e-2", "--set",
                  "train.save_steps=0", "--set", "generate.samples=1", "--set", "generate.max_new_tokens=4",
                  "--set", "adapter.r=4", "--output", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dtype torch.bfloat16" in " ".join((res.stdout + res.stderr).split())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(loss == loss and loss < 100 for loss in losses)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}

    # PPO chained from that run: the bf16 policy's adapter-off reference, the fp32 shared value head
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["instruction"]} for r in QA])
    ppo = tmp_path / "ppo"
    res = run_cli("ppo", "--set", f"model.name={out}", "--set", f"data.train={prompts}", "--set",
                  "data.eval_split=2", "--set", "rewards=[{name: length, max: 8, unit: chars}]", "--set",
                  "ppo.prompts_per_step=2", "--set", "ppo.samples_per_prompt=2", "--set", "ppo.max_new_tokens=4",
                  "--set", "train.max_steps=2", "--set", "train.save_steps=0", "--set", "generate.samples=0",
                  "--set", "adapter.r=4", "--output", ppo)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in steps if r.get("step") == 1 and "kl" in r)
    assert abs(first["kl"]) < 1e-3  # the reference is the policy with its (zero-initialised) adapter off


@native
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_trl_stages_run_on_bf16_base(tmp_path, bf16_model_dir, stage):
    """TRL's DPO and GRPO trainers under a bf16 frozen base with fp32 LoRA (TrainingArguments bf16 stays off on a
    CPU: no autocast, the weights are already bf16): they train, and the step-0 DPO loss is log 2."""
    if stage == "dpo":
        rows = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "No."} for r in QA]
        extra = ["train.logging_steps=1"]
    else:
        rows = [{"prompt": f"What is {a} plus 1?", "answer": f"#### {a + 1}"} for a in range(8)]
        extra = ["grpo.num_generations=2", "grpo.max_completion_length=4", "rewards=[{name: math_answer}]"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sets = [f"model.name={bf16_model_dir}", f"data.train={data}", "train.max_steps=2", "train.batch_size=4",
            "train.save_steps=0", "generate.samples=0", "adapter.r=4", "adapter.dropout=0", *extra]
    out = tmp_path / stage
    res = run_cli(stage, *[a for s in sets for a in ("--set", s)], "--output", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dtype torch.bfloat16" in " ".join((res.stdout + res.stderr).split())
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}
    if stage == "dpo":
        first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                     if "loss" in json.loads(line))
        assert first["loss"] == pytest.approx(0.6931, abs=2e-3)
