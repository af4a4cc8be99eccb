"""Resume safety: `--resume` compares the recipe with the interrupted run's recipe.yaml before touching any of
its files, names the changed keys, and allows only longer training (max_steps, epochs)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.config.load import dump_recipe, load_recipe
from tunekit.errors import TunekitError
from tunekit.run.rundir import RunDir, check_resume

BASE = ["model.name=some/model", "data.train=d.jsonl", "train.max_steps=10", "adapter.r=8"]


def _interrupted(tmp_path, *overrides: str) -> RunDir:
    work = tmp_path / "r.partial"
    work.mkdir(exist_ok=True)
    (work / "recipe.yaml").write_text(dump_recipe(load_recipe(None, [*BASE, *overrides])))
    return RunDir(tmp_path / "r", work, True)


@pytest.mark.parametrize(
    "change, named",
    [
        (["train.lr=1e-3"], ["train.lr"]),
        (["adapter.r=16", "model.name=other/model"], ["adapter.r", "model.name"]),
        (["data.train=other.jsonl"], ["data.train"]),
        (["adapter.method=dora"], ["adapter.method"]),
        (["train.seed=7"], ["train.seed"]),
        (["data.max_length=64"], ["data.max_length"]),
    ],
)
def test_changed_keys_are_named(tmp_path, change, named):
    run = _interrupted(tmp_path)
    with pytest.raises(TunekitError) as info:
        check_resume(load_recipe(None, [*BASE, *change]), run)
    for key in named:
        assert key in str(info.value)
    assert "--resume with a changed recipe" in str(info.value)


def test_longer_training_and_post_training_keys_are_allowed(tmp_path):
    run = _interrupted(tmp_path)
    check_resume(load_recipe(None, BASE), run)
    check_resume(load_recipe(None, [*BASE, "train.max_steps=50"]), run)
    check_resume(load_recipe(None, [*BASE, "generate.samples=0", "train.logging_steps=5"]), run)
    with pytest.raises(TunekitError, match=r"may extend train.max_steps, not shrink it \(10 -> 5\)"):
        check_resume(load_recipe(None, [*BASE, "train.max_steps=5"]), run)
    run = _interrupted(tmp_path, "train.max_steps=-1", "train.epochs=1")
    check_resume(load_recipe(None, [*BASE, "train.max_steps=-1", "train.epochs=3"]), run)
    with pytest.raises(TunekitError, match="not shrink"):
        check_resume(load_recipe(None, [*BASE, "train.max_steps=-1", "train.epochs=0.5"]), run)


def test_unreadable_stored_recipe_is_refused(tmp_path):
    run = _interrupted(tmp_path)
    (run.path / "recipe.yaml").unlink()
    with pytest.raises(TunekitError, match="recipe.yaml: missing"):
        check_resume(load_recipe(None, BASE), run)
    (run.path / "recipe.yaml").write_text("train: [\n")
    with pytest.raises(TunekitError, match="invalid YAML"):
        check_resume(load_recipe(None, BASE), run)


def _tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow  # several tunekit subprocesses (~20-40 s on an idle 2-core machine)
def test_resume_cli_refuses_a_change_without_touching_the_run_then_extends(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "run"
    common = ["--set", f"model.name={tiny_model_dir}", "--set", f"data.train={data}", "--set", "train.save_steps=1",
              "--set", "generate.samples=0", "--output", out]
    res = run_cli("sft", *common, "--set", "train.max_steps=2")
    assert res.returncode == 0, res.stderr
    partial = out.with_name("run.partial")
    out.rename(partial)  # an interrupted run: recipe.yaml and checkpoints, not yet renamed into place
    before = _tree(partial)
    res = run_cli("sft", *common, "--set", "train.max_steps=2", "--set", "train.lr=1e-3", "--resume")
    assert res.returncode == 2 and "train.lr (0.0002 -> 0.001)" in res.stderr, res.stderr
    assert _tree(partial) == before and not out.exists()
    res = run_cli("sft", *common, "--set", "train.max_steps=3", "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming from checkpoint-2" in res.stderr
    assert json.loads((out / "run_card.json").read_text())["global_step"] == 3


GRPO_PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": f"#### {a + b}"}
                for a in range(1, 5) for b in range(1, 4)]
GRPO_SETS = ["grpo.num_generations=2", "grpo.max_completion_length=6", "grpo.log_completions_steps=0",
             "rewards=[{name: 'python:tests.helpers:share_of_e'}]"]


@pytest.mark.slow  # two tunekit runs per stage (~15-30 s each on an idle 2-core machine)
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_resume_after_the_last_checkpoint_only_finishes(tmp_path, tiny_model_dir, stage):
    """A run killed after its last checkpoint (checkpoint-4 of max_steps 4), resumed: no step 5 (transformers'
    loop would train one past max_steps), the saved adapter is checkpoint-4's, and each step is logged once."""
    from safetensors.torch import load_file

    rows, extra = (GRPO_PROMPTS, GRPO_SETS) if stage == "grpo" else (QA, [])
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    sets = [f"model.name={tiny_model_dir}", f"data.train={data}", "train.max_steps=4", "train.save_steps=2",
            "train.batch_size=2", "train.lr=1e-3", "generate.samples=0", *extra]
    args = [stage, *(a for s in sets for a in ("--set", s)), "--output", out]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    partial = out.with_name("run.partial")
    out.rename(partial)  # what a kill after checkpoint-4, before the final save, leaves behind
    for name in ("adapter", "loss.png"):
        path = partial / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    last = partial / "checkpoints" / "checkpoint-4"
    assert (last / "trainer_state.json").is_file()
    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from checkpoint-4" in res.stderr, res.stderr
    card = json.loads((out / "run_card.json").read_text())
    assert card["global_step"] == 4, res.stderr  # not 5 of 4
    assert card["metrics"]["train_loss"] > 0 and "nothing left to train" in res.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [1, 2, 3, 4], steps  # none twice, none past max_steps
    assert [r["step"] for r in logged if "train_runtime" in r] == [4]  # one summary row
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    at_checkpoint = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert saved.keys() == at_checkpoint.keys()
    assert all(torch.equal(saved[k], at_checkpoint[k]) for k in saved)  # nothing was trained after it
