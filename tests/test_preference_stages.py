"""`tunekit rm` and `tunekit dpo` on a tiny model: runs, saves, reloads in plain PEFT/transformers; the step-0
losses equal their formulas from hand-computed scores/log-probs; one copy of the base weights; resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.helpers import interrupt_after_checkpoint, run_cli, write_jsonl
from tunekit.config import load_recipe

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1} maybe"}
         for a in range(1, 5) for b in range(1, 5)]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", PAIRS)


def _sets(model_dir, data, *extra):
    base = [f"model.name={model_dir}", f"data.train={data}", "train.max_steps=2", "train.batch_size=2",
            "train.lr=1e-3", "train.save_steps=0", "generate.samples=2", "generate.max_new_tokens=4", *extra]
    return [a for s in base for a in ("--set", s)]


def _stage_context(stage, recipe, tmp_path):
    from tunekit.run.rundir import RunDir
    from tunekit.stages.runner import Context

    tok = stage.load_tokenizer(recipe)
    data = stage.load_data(recipe, tok)
    tok, model = stage.load_model(recipe, tok)
    run = RunDir.prepare(tmp_path / "ctx")
    run.create()
    return Context(recipe, run, tok, model, data, resume=False)


def _base_storages(*modules) -> int:
    """Distinct storages of the base (non-adapter) weights."""
    seen = set()
    for m in modules:
        if m is None:
            continue
        for name, p in m.named_parameters():
            if "lora_" not in name:
                seen.add(p.untyped_storage().data_ptr())
    return len(seen)


def test_dpo_step0_loss_is_the_formula_with_one_copy_of_the_weights(tmp_path, tiny_model_dir, pref_file):
    """loss = −mean log σ(β[(π_c − ref_c) − (π_r − ref_r)]), sums of completion-token log-probs."""
    from tunekit.stages.dpo import DPOStage

    beta = 0.3
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={pref_file}", f"dpo.beta={beta}",
                                "train.batch_size=4", "train.max_steps=1", "adapter.dropout=0"],
                         defaults={"stage": "dpo"})
    stage = DPOStage()
    ctx = _stage_context(stage, recipe, tmp_path)
    base_storages = _base_storages(ctx.model)
    trainer = stage.build_trainer(ctx)
    # no reference model: TRL's frozen "ref" adapter (a copy of the initial LoRA) sits on the same base weights
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    assert _base_storages(trainer.model, trainer.ref_model) == base_storages
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.eval()

    def seq_logps(m):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (lp * batch["completion_mask"][:, 1:]).sum(1)

    pol = seq_logps(model)
    with model.disable_adapter():  # = the "ref" adapter at step 0: LoRA's B starts at zero
        ref = seq_logps(model)
    n = pol.shape[0] // 2
    logits = beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    by_hand = -torch.nn.functional.logsigmoid(logits).mean()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-5)
    # the step-0 policy is the reference: every implicit reward is 0, the loss log 2
    assert float(by_hand) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)


def test_rm_step0_loss_is_bradley_terry_with_margin(tmp_path, tiny_model_dir):
    """loss = −mean log σ(r_c − r_r − m) with the score head's outputs."""
    from tunekit.stages.rm import RewardModelStage

    rows = [dict(p, margin=0.5 * (i % 3)) for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "train.batch_size=4",
                                "train.max_steps=1", "adapter.dropout=0"], defaults={"stage": "rm"})
    stage = RewardModelStage()
    ctx = _stage_context(stage, recipe, tmp_path)
    trainer = stage.build_trainer(ctx)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.eval()
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        n = scores.shape[0] // 2
        by_hand = -torch.nn.functional.logsigmoid(scores[:n] - scores[n:] - batch["margin"]).mean()
        loss = trainer.compute_loss(model, dict(batch))
    assert batch["margin"].abs().sum() > 0
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-6)


def test_rm_run_reloads_with_the_same_scores(tmp_path, tiny_model_dir, pref_file):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    res = run_cli("rm", *_sets(tiny_model_dir, pref_file), "--output", out)
    assert res.returncode == 0, res.stderr
    for name in ("recipe.yaml", "run_card.json", "metrics.jsonl", "loss.png", "samples.jsonl"):
        assert (out / name).is_file(), name
    card = json.loads((out / "run_card.json").read_text())
    assert card["stage"] == "rm" and "eval_accuracy" in card["metrics"]
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    text = tok.apply_chat_template(sample["prompt"] + [{"role": "assistant", "content": sample["chosen"]}],
                                   tokenize=False)
    with torch.no_grad():
        score = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits.item()
    assert score == pytest.approx(sample["reward_chosen"], abs=1e-4)
    ev = run_cli("eval", out, "--data", pref_file)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["mode"] == "reward_model"
    assert 0 <= result["metrics"]["pairwise_accuracy"]["value"] <= 1 and "mean_margin" in result["metrics"]


def test_dpo_run_reloads_in_plain_peft(tmp_path, tiny_model_dir, pref_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    res = run_cli("dpo", *_sets(tiny_model_dir, pref_file), "--output", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in rows) and any("eval_rewards/margins" in r for r in rows)
    assert (out / "samples.jsonl").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    ev = run_cli("eval", out, "--data", pref_file)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert 0 <= result["metrics"]["implicit_reward_accuracy"]["value"] <= 1
    beta = yaml.safe_load((out / "recipe.yaml").read_text())["dpo"]["beta"]
    assert result["settings"]["stage"] == "dpo" and result["settings"]["beta"] == beta
    assert f"β = {beta:g}" in result["measures"]


def test_a_section_of_another_stage_is_refused(tmp_path, tiny_model_dir, pref_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: {tiny_model_dir}\ndpo:\n  beta: 0.2\n")
    res = run_cli("sft", recipe, "--set", f"data.train={pref_file}", "--output", tmp_path / "o")
    assert res.returncode == 2 and "r.yaml:3: section 'dpo' belongs to stage dpo" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
    res = run_cli("dpo", "--set", f"data.train={pref_file}", "--set", "dpo.loss_type=sigmod", "--dry-run")
    assert res.returncode == 2 and "did you mean 'sigmoid'" in res.stderr


@pytest.mark.slow
def test_dpo_resume_after_sigkill(tmp_path, tiny_model_dir, pref_file):
    out = tmp_path / "run"
    sets = _sets(tiny_model_dir, pref_file, "train.max_steps=60", "train.save_steps=2", "train.save_total_limit=1",
                 "generate.samples=0")
    step = interrupt_after_checkpoint(["dpo", *sets], out)
    res = run_cli("dpo", *sets, "--output", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{step}" in res.stderr
    assert json.loads((out / "run_card.json").read_text())["global_step"] == 60


METHODS = [("lora", []), ("dora", []), ("pissa", []), ("milora", []), ("lora_xs", []), ("svft", []),
           ("none", ["train.lr=1e-5"]), ("lora", ["model.load_in_4bit=true"])]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", METHODS, ids=[m if not e else f"{m}-{e[0]}" for m, e in METHODS])
def test_every_adapter_method_trains_with_dpo(tmp_path, tiny_model_dir, pref_file, method, extra):
    """One DPO step per method; the step-0 loss is log 2 (policy = reference) whichever way the reference is
    kept (frozen initial adapter, or precomputed log-probs)."""
    from tunekit.stages.dpo import run_dpo

    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={pref_file}", f"output={tmp_path / 'r'}",
                                f"adapter.method={method}", "adapter.r=4", "adapter.dropout=0", "train.max_steps=1",
                                "train.batch_size=2", "train.save_steps=0", "generate.samples=0", *extra],
                         defaults={"stage": "dpo"})
    result = run_dpo(recipe)
    first = json.loads((result.path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=2e-3)
    assert (result.path / ("model" if method == "none" else "adapter")).is_dir()


@pytest.mark.parametrize("method", ["lora_xs", "svft"])
def test_reward_model_refuses_svd_adapters_before_work(tmp_path, tiny_model_dir, pref_file, method):
    res = run_cli("rm", *_sets(tiny_model_dir, pref_file, f"adapter.method={method}"), "--output", tmp_path / "o")
    assert res.returncode == 2 and "cannot train a reward model" in res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
