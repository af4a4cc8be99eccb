"""Numerical guards: training stops at the first non-finite loss/gradient/weight keeping the last good
checkpoint; merging and adapter folding refuse non-finite input and output tensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import QA, run_cli, write_jsonl


def _poison(src, dst, suffix="q_proj.weight", value=float("nan")):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in weights if k.endswith(suffix))
    weights[name][0, 0] = value
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst, name


def test_divergence_stops_at_first_bad_step_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    """lr = 1e30 (finite, so the schema accepts it): step 1 makes LoRA-B ~1e30, step 2's forward overflows to
    inf/nan. The guard stops at step 2, before its update and before a checkpoint of it exists."""
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "r"
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={data}",
                  "--set", "train.max_steps=6", "--set", "train.save_steps=1", "--set", "train.lr=1e30",
                  "--set", "train.warmup_ratio=0", "--set", "train.lr_scheduler=constant",
                  "--set", "train.max_grad_norm=0", "--set", "generate.samples=0", "--output", out)
    assert res.returncode == 3, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training stopped at step" in errors[0] and "Traceback" not in res.stderr
    step = int(errors[0].split("training stopped at step ")[1].split(":")[0])
    assert step >= 2
    partial = out.with_name("r.partial")
    ckpts = sorted(int(p.name.split("-")[1]) for p in (partial / "checkpoints").glob("checkpoint-*"))
    assert ckpts and ckpts[-1] == step - 1 and f"checkpoint-{step - 1}" in errors[0] and "--resume" in errors[0]
    saved = load_file(partial / "checkpoints" / f"checkpoint-{step - 1}" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())  # the kept checkpoint is finite
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_inputs(tmp_path, tiny_model_dir, value):
    bad, name = _poison(tiny_model_dir, tmp_path / "bad", value=value)
    out = tmp_path / "m"
    res = run_cli("merge", "--method", "linear", tiny_model_dir, bad, "-o", out, "--no-progress")
    assert res.returncode == 3, res.stderr
    assert f"input tensor '{name}' has 1 non-finite values" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_merge_refuses_a_non_finite_output(tmp_path, tiny_model_dir):
    """Finite inputs whose merge overflows float16: base + 2·(60000 − base) ≈ 1.2e5 > 65504 = inf once cast."""
    big, name = _poison(tiny_model_dir, tmp_path / "big", value=60000.0)
    shutil.copytree(big, tmp_path / "big2")
    res = run_cli("merge", "--method", "task_arithmetic", "--base", tiny_model_dir, "--weights", "1,1", big,
                  tmp_path / "big2", "-o", tmp_path / "m", "--dtype", "float16", "--no-progress")
    assert res.returncode == 3, res.stderr
    assert f"output tensor '{name}'" in res.stderr and "non-finite" in res.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # several tunekit subprocesses (~20-40 s on an idle 2-core machine)
def test_adapter_folding_refuses_a_non_finite_adapter(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    run = tmp_path / "run"
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={data}",
                  "--set", "train.max_steps=1", "--set", "generate.samples=0", "--output", run)
    assert res.returncode == 0, res.stderr
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key].fill_(float("inf"))
    save_file(weights, run / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    res = run_cli("merge", "--adapter", run, "-o", tmp_path / "folded", "--no-progress")
    assert res.returncode == 3, res.stderr
    assert "non-finite" in res.stderr and not (tmp_path / "folded").exists()
