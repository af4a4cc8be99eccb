"""`tunekit kto`, `tunekit orpo`, `tunekit simpo` (and its cpo variant) on a tiny model: each step-0 loss equals its
formula computed here from the model's own full-vocabulary log-probs (KTO with its batch KL estimate), the
unpaired data format and its errors, the recipe keys, short runs of each command, `tunekit eval` on their runs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import interrupt_after_checkpoint, run_cli, write_jsonl
from tunekit.config import load_recipe
from tunekit.errors import TunekitError

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1} maybe not"}
         for a in range(1, 5) for b in range(1, 5)]
# unpaired feedback, imbalanced: 3 desirable to 1 undesirable
UNPAIRED = [{"prompt": f"Name the number after {n}.", "completion": f"{n + 1}" if n % 4 else f"{n + 2}, I think",
             "label": bool(n % 4)} for n in range(16)]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("unpaired") / "feedback.jsonl", UNPAIRED)


def _recipe(stage, model_dir, data, *extra):
    return load_recipe(None, [f"model.name={model_dir}", f"data.train={data}", "train.batch_size=4",
                              "train.max_steps=1", "adapter.dropout=0", "data.eval_split=0", *extra],
                       defaults={"stage": stage})


def _trainer(stage, recipe, tmp_path):
    from tunekit.run.rundir import RunDir
    from tunekit.stages.runner import Context

    tok = stage.load_tokenizer(recipe)
    data = stage.load_data(recipe, tok)
    tok, model = stage.load_model(recipe, tok)
    run = RunDir.prepare(tmp_path / "ctx")
    run.create()
    ctx = Context(recipe, run, tok, model, data, resume=False)
    return stage.build_trainer(ctx), ctx


def _full_logps(model, input_ids, attention_mask, answer_mask):
    """(Σ log-probs of the answer tokens, answer token count) per row, from the model's full logits."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    m = answer_mask[:, 1:].float()
    return (lp * m).sum(1).double(), m.sum(1).double()


# ---------------------------------------------------------------- losses equal their formulas at step 0


def test_kto_step0_loss_is_the_formula_with_the_batch_kl_estimate(tmp_path, tiny_model_dir, unpaired_file):
    """loss = mean[λ_D (1 − σ(β(r − z₀))) | λ_U (1 − σ(β(z₀ − r)))], r = log π − log π_ref of the answer,
    z₀ = max(0, mean(log π − log π_ref) of each prompt with its batch neighbour's answer)."""
    from tunekit.stages.kto import KTOStage

    beta, w_d, w_u = 0.5, 1.3, 0.7
    recipe = _recipe("kto", tiny_model_dir, unpaired_file, f"kto.beta={beta}", f"kto.desirable_weight={w_d}",
                     f"kto.undesirable_weight={w_u}")
    trainer, _ = _trainer(KTOStage(), recipe, tmp_path)
    model = trainer.model
    # the reference of a fresh LoRA: the model with its adapters disabled (no "ref" copy), exactly the start model
    assert trainer.ref_model is None and "ref" not in model.peft_config
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        start, _ = _full_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        with model.disable_adapter():
            disabled, _ = _full_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert torch.allclose(start, disabled, atol=1e-9)
    labels = batch["label"].bool()
    assert labels.any() and (~labels).any(), "the batch should hold both kinds"
    # the KL sequences pair each prompt with the previous record's answer
    ans = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["completion_mask"])]
    kl_ans = [ids[m.bool()].tolist() for ids, m in zip(batch["KL_input_ids"], batch["KL_completion_mask"])]
    assert kl_ans == [ans[-1]] + ans[:-1]
    model.eval()
    for seed in range(20):  # move the trained adapter off the reference until the KL estimate is positive
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B.default" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        pol, _ = _full_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pol_kl, _ = _full_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        with model.disable_adapter():
            ref, _ = _full_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref_kl, _ = _full_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                    batch["KL_completion_mask"])
        z0 = (pol_kl - ref_kl).mean().clamp(min=0)
        if z0 > 1e-2:
            break
    assert z0 > 1e-2
    r = pol - ref
    assert r.abs().max() > 1e-2
    losses = torch.where(labels, w_d * (1 - torch.sigmoid(beta * (r - z0))), w_u * (1 - torch.sigmoid(beta * (z0 - r))))
    by_hand = losses.mean()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-5)
    # the KL estimate matters: without it the loss differs
    without = torch.where(labels, w_d * (1 - torch.sigmoid(beta * r)), w_u * (1 - torch.sigmoid(-beta * r))).mean()
    assert abs(float(without) - float(by_hand)) > 1e-4


def _pair_batch(stage_cls, stage, tmp_path, model_dir, data, *extra):
    recipe = _recipe(stage, model_dir, data, *extra)
    trainer, ctx = _trainer(stage_cls(), recipe, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.eval()
    s, n = _full_logps(model, batch["input_ids"], batch["attention_mask"], (batch["labels"] != -100).long())
    b = s.shape[0] // 2
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    return float(loss), (s[:b], s[b:], n[:b], n[b:]), batch, ctx


def test_pair_batches_label_exactly_the_answer_tokens(tmp_path, tiny_model_dir, pref_file):
    from tunekit.stages.orpo import ORPOStage

    _, (_, _, n_c, n_r), batch, ctx = _pair_batch(ORPOStage, "orpo", tmp_path, tiny_model_dir, pref_file)
    tok = ctx.tokenizer
    b = batch["input_ids"].shape[0] // 2
    for i in range(b):
        # the answer with its end-of-turn token (and the template's newline after it), as `tunekit eval` scores it
        chosen = tok.decode(batch["labels"][i][batch["labels"][i] != -100]).rstrip("\n")
        rejected = tok.decode(batch["labels"][b + i][batch["labels"][b + i] != -100]).rstrip("\n")
        assert chosen.endswith("<|im_end|>") and chosen.removesuffix("<|im_end|>").strip().isdigit()
        assert rejected.removesuffix("<|im_end|>").endswith("maybe not")
    assert (n_r > n_c).all()


def test_orpo_step0_loss_is_the_formula(tmp_path, tiny_model_dir, pref_file):
    """loss = NLL(y_c) + λ · −mean log σ(log odds(y_c) − log odds(y_r)), odds = p/(1 − p), p = exp(mean log-prob)."""
    from tunekit.stages.orpo import ORPOStage

    lam = 0.7
    loss, (s_c, s_r, n_c, n_r), _, _ = _pair_batch(ORPOStage, "orpo", tmp_path, tiny_model_dir, pref_file,
                                                   f"orpo.lambda={lam}")
    p_c, p_r = torch.exp(s_c / n_c), torch.exp(s_r / n_r)
    odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
    nll = -s_c.sum() / n_c.sum()
    by_hand = nll - lam * F.logsigmoid(torch.log(odds_c) - torch.log(odds_r)).mean()
    assert loss == pytest.approx(float(by_hand), abs=1e-5)


def test_simpo_step0_loss_is_the_formula(tmp_path, tiny_model_dir, pref_file):
    """loss = −mean log σ(β/|y_c| log π(y_c|x) − β/|y_r| log π(y_r|x) − γ); γ from gamma or β · gamma_beta_ratio."""
    from tunekit.stages.simpo import SimPOStage

    beta, gamma = 2.5, 0.4
    loss, (s_c, s_r, n_c, n_r), _, _ = _pair_batch(SimPOStage, "simpo", tmp_path, tiny_model_dir, pref_file,
                                                   f"simpo.beta={beta}", f"simpo.gamma={gamma}")
    by_hand = -F.logsigmoid(beta * s_c / n_c - beta * s_r / n_r - gamma).mean()
    assert loss == pytest.approx(float(by_hand), abs=1e-5)
    loss2, (s_c, s_r, n_c, n_r), _, _ = _pair_batch(SimPOStage, "simpo", tmp_path / "2", tiny_model_dir, pref_file,
                                                    f"simpo.beta={beta}", "simpo.gamma_beta_ratio=0.3")
    assert loss2 == pytest.approx(float(-F.logsigmoid(beta * (s_c / n_c - s_r / n_r) - 0.3 * beta).mean()), abs=1e-5)


def test_cpo_step0_loss_is_the_formula(tmp_path, tiny_model_dir, pref_file):
    """loss = −mean log σ(β log π(y_c|x) − β log π(y_r|x)) + α · NLL(y_c)."""
    from tunekit.stages.simpo import SimPOStage

    beta, alpha = 0.2, 0.6
    loss, (s_c, s_r, n_c, n_r), _, _ = _pair_batch(SimPOStage, "simpo", tmp_path, tiny_model_dir, pref_file,
                                                   "simpo.variant=cpo", f"cpo.beta={beta}", f"cpo.alpha={alpha}")
    by_hand = -F.logsigmoid(beta * (s_c - s_r)).mean() + alpha * (-s_c.sum() / n_c.sum())
    assert loss == pytest.approx(float(by_hand), abs=1e-5)


def test_the_plain_head_gives_the_same_pairwise_loss(tmp_path, tiny_model_dir, pref_file):
    """train.loss_impl=plain (full logits) and the chunked head agree, loss and gradient."""
    from tunekit.stages.simpo import SimPOStage

    grads = []
    for impl in ("chunked", "plain"):
        recipe = _recipe("simpo", tiny_model_dir, pref_file, f"train.loss_impl={impl}")
        trainer, _ = _trainer(SimPOStage(), recipe, tmp_path / impl)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters()
                                              if p.grad is not None])))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_log_odds_stays_finite_near_certainty():
    from tunekit.training.pairwise import log_odds

    m = torch.tensor([-1e-9, -0.5, -30.0], dtype=torch.float64)
    got = log_odds(m)
    assert torch.isfinite(got).all()
    assert float(got[1]) == pytest.approx(math.log(math.exp(-0.5) / (1 - math.exp(-0.5))), abs=1e-12)


# ---------------------------------------------------------------- data: the unpaired format


def test_unpaired_records_and_pairs_split_into_feedback():
    from tunekit.data.preference import FeedbackRecord, PreferencePair, to_feedback, unpair

    rec = to_feedback({"prompt": "Hi?", "completion": "Hello.", "label": False}, "auto", "f.jsonl:1")
    assert isinstance(rec, FeedbackRecord) and rec.label is False
    assert rec.as_row() == {"prompt": [{"role": "user", "content": "Hi?"}],
                            "completion": [{"role": "assistant", "content": "Hello."}], "label": False}
    pair = to_feedback(PAIRS[0], "auto", "f.jsonl:2")
    assert isinstance(pair, PreferencePair)
    split = unpair([pair, rec])
    assert [(r.completion[-1]["content"], r.label) for r in split] == [("2", True), ("3 maybe not", False),
                                                                        ("Hello.", False)]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi?", "completion": "Hello.", "label": 1}, "f.jsonl:7: field 'label' must be true"),
    ({"prompt": "Hi?", "completion": "Hello.", "label": "yes"}, "f.jsonl:7: field 'label' must be true"),
    ({"prompt": "Hi?", "label": True}, "f.jsonl:7: missing field 'completion' (unpaired format"),
    ({"prompt": "Hi?", "completion": [{"role": "user", "content": "x"}], "label": True},
     "f.jsonl:7: 'completion' must hold only assistant turns"),
    ({"question": "Hi?"}, "f.jsonl:7: not a feedback record (fields: question)"),
])
def test_unpaired_format_errors_name_file_and_line(record, message):
    from tunekit.data.preference import to_feedback

    with pytest.raises(TunekitError, match="^" + re.escape(message)):
        to_feedback(record, "auto", "f.jsonl:7")


def test_a_feedback_format_given_to_a_conversation_stage_is_an_error():
    from tunekit.data.formats import to_messages

    with pytest.raises(TunekitError, match="^f.jsonl:3: data format 'unpaired' is not a conversation format"):
        to_messages(UNPAIRED[0], "unpaired", "f.jsonl:3")


def test_kto_splits_pairs_into_shuffled_records(tiny_model_dir, pref_file):
    """16 pairs → 32 records, 16 of each label, shuffled after the split (a pair's halves would otherwise be
    neighbours, and TRL's KL estimate would pair a prompt with its own other answer)."""
    from tunekit.stages.kto import KTOStage

    stage = KTOStage()
    recipe = _recipe("kto", tiny_model_dir, pref_file)
    data = stage.load_data(recipe, stage.load_tokenizer(recipe))
    labels = data.train["label"]
    assert len(labels) == 32 and sum(labels) == 16
    prompts = [p[-1]["content"] for p in data.train["prompt"]]
    assert sum(a == b for a, b in zip(prompts, prompts[1:])) < 8
    assert data.counts["train_desirable"] == 16 and "16 desirable / 16 undesirable" in data.summary


def test_kto_weight_advice_follows_the_paper():
    from tunekit.stages.kto import weight_advice

    assert weight_advice(100, 100, 1.0, 1.0) is None
    assert weight_advice(120, 100, 1.0, 1.0) is None  # λ_D n_D / λ_U n_U = 1.2 in [1, 4/3]
    advice = weight_advice(100, 300, 1.0, 1.0)
    assert advice and "desirable_weight in [3.00, 4.00]" in advice and "undesirable_weight in [0.25, 0.33]" in advice
    assert weight_advice(100, 300, 3.5, 1.0) is None


def test_bad_feedback_file_fails_before_any_work(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*UNPAIRED[:3], {"prompt": "x", "completion": "y", "label": "good"}])
    res = run_cli("kto", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={bad}",
                  "--output", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert f"error: {bad}:4: field 'label' must be true (desirable) or false (undesirable), got 'good'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ---------------------------------------------------------------- recipe keys


def test_recipe_keys_of_the_new_stages():
    from tunekit.config.load import dump_recipe

    r = load_recipe(None, ["orpo.lambda=0.25"], defaults={"stage": "orpo"})
    assert r.orpo.lambda_ == 0.25 and "lambda: 0.25" in dump_recipe(r)
    assert load_recipe(None, ["simpo.beta=2.0"], defaults={"stage": "simpo"}).simpo.margin == pytest.approx(1.0)
    for sets, message in [
        (["simpo.gamma=1.0", "simpo.gamma_beta_ratio=0.3"], "set either simpo.gamma or simpo.gamma_beta_ratio"),
        (["cpo.alpha=0.5"], "cpo.alpha: no effect with simpo.variant simpo"),
        (["simpo.variant=cpo", "simpo.gamma=0.5"], "simpo.gamma: no effect with simpo.variant cpo"),
        (["simpo.variant=ipo"], "simpo.variant"),
        (["orpo.lamda=0.2"], "did you mean 'orpo.lambda'"),
    ]:
        with pytest.raises(TunekitError, match=message):
            load_recipe(None, sets, defaults={"stage": "simpo" if "orpo" not in sets[0] else "orpo"})
    with pytest.raises(TunekitError, match="batch_size >= 2"):
        load_recipe(None, ["train.batch_size=1"], defaults={"stage": "kto"})
    with pytest.raises(TunekitError, match="section 'kto' belongs to stage kto"):
        load_recipe(None, ["kto.beta=0.2"], defaults={"stage": "orpo"})


# ---------------------------------------------------------------- the commands


def _sets(model_dir, data, *extra):
    base = [f"model.name={model_dir}", f"data.train={data}", "train.max_steps=2", "train.batch_size=4",
            "train.lr=1e-3", "train.save_steps=0", "generate.samples=2", "generate.max_new_tokens=4", *extra]
    return [a for s in base for a in ("--set", s)]


@pytest.mark.slow
def test_kto_command_on_unpaired_data(tmp_path, tiny_model_dir, unpaired_file, pref_file):
    """`tunekit kto` on imbalanced unpaired feedback: the paper's weight advice, a run dir, `tunekit eval`."""
    out = tmp_path / "kto"
    res = run_cli("kto", *_sets(tiny_model_dir, unpaired_file), "--output", out)
    assert res.returncode == 0, res.stderr
    text = " ".join((res.stderr + res.stdout).split())
    assert "desirable vs" in text and "advises 1 to 4/3" in text and "(but NOT BOTH)" not in text  # ours, once
    for name in ("recipe.yaml", "run_card.json", "metrics.jsonl", "loss.png", "samples.jsonl",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    card = json.loads((out / "run_card.json").read_text())
    assert card["stage"] == "kto" and card["global_step"] == 2 and card["data"]["train_undesirable"] > 0
    ev = run_cli("eval", out, "--data", pref_file)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["settings"]["stage"] == "kto" and result["settings"]["beta"] > 0
    assert 0 <= result["metrics"]["implicit_reward_accuracy"]["value"] <= 1


@pytest.mark.slow
def test_simpo_command_reports_held_out_preference_accuracy(tmp_path, tiny_model_dir, pref_file):
    out = tmp_path / "simpo"
    res = run_cli("simpo", *_sets(tiny_model_dir, pref_file, "data.eval_split=4"), "--output", out)
    assert res.returncode == 0, res.stderr
    assert "held-out preference accuracy" in res.stderr + res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in rows) and any("eval_rewards/accuracies" in r for r in rows)
    ev = run_cli("eval", out, "--data", pref_file)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["settings"]["stage"] == "simpo" and result["settings"]["reward"] == "mean token log-prob"
    assert 0 <= result["metrics"]["preference_accuracy"]["value"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [("orpo", []), ("simpo", ["simpo.variant=cpo"])], ids=["orpo", "cpo"])
def test_orpo_and_cpo_runs_evaluate(tmp_path, tiny_model_dir, pref_file, stage, extra):
    import importlib

    from tunekit.evaluation.command import EvalRequest, run_eval

    run = getattr(importlib.import_module(f"tunekit.stages.{stage}"), f"run_{stage}")
    result = run(load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={pref_file}",
                                    f"output={tmp_path / stage}", "train.max_steps=2", "train.batch_size=4",
                                    "train.save_steps=0", "generate.samples=1", "generate.max_new_tokens=4", *extra],
                            defaults={"stage": stage}))
    assert (result.path / "adapter/adapter_model.safetensors").is_file() and (result.path / "samples.jsonl").is_file()
    assert "eval_rewards/accuracies" in result.metrics
    ev = run_eval(EvalRequest(str(result.path), data=str(pref_file)))
    assert ev["settings"]["stage"] == stage and 0 <= ev["metrics"]["preference_accuracy"]["value"] <= 1
    assert ev["settings"]["reward"] == ("summed log-prob" if extra else "mean token log-prob")


METHODS = [("kto", "none", ["train.lr=1e-5"]), ("kto", "svft", []), ("kto", "pissa", []),
           ("kto", "lora", ["model.load_in_4bit=true"]), ("orpo", "lora_xs", []), ("orpo", "none", ["train.lr=1e-5"]),
           ("orpo", "lora", ["model.load_in_4bit=true"]), ("simpo", "dora", ["train.gradient_checkpointing=true"])]


@pytest.mark.slow
@pytest.mark.parametrize("stage, method, extra", METHODS,
                         ids=[f"{s}-{m}" + ("-4bit" if e and "4bit" in e[0] else "") for s, m, e in METHODS])
def test_adapter_methods_train(tmp_path, tiny_model_dir, pref_file, stage, method, extra):
    """KTO's step-0 loss is 0.5·mean(weights) whichever way the reference is kept (policy = reference)."""
    import importlib

    run = getattr(importlib.import_module(f"tunekit.stages.{stage}"), f"run_{stage}")
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={pref_file}", f"output={tmp_path / 'r'}",
                                f"adapter.method={method}", "adapter.r=4", "adapter.dropout=0", "train.max_steps=1",
                                "train.batch_size=4", "train.save_steps=0", "generate.samples=0", *extra],
                         defaults={"stage": stage})
    result = run(recipe)
    first = json.loads((result.path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(first["loss"])
    if stage == "kto":
        assert first["loss"] == pytest.approx(0.5, abs=2e-3)
    assert (result.path / ("model" if method == "none" else "adapter")).is_dir()


@pytest.mark.slow
def test_simpo_resume_after_sigkill(tmp_path, tiny_model_dir, pref_file):
    out = tmp_path / "run"
    sets = _sets(tiny_model_dir, pref_file, "train.max_steps=20", "train.save_steps=2", "train.save_total_limit=1",
                 "generate.samples=0", "train.batch_size=2")
    step = interrupt_after_checkpoint(["simpo", *sets], out)
    res = run_cli("simpo", *sets, "--output", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{step}" in res.stderr
    assert json.loads((out / "run_card.json").read_text())["global_step"] == 20


@pytest.mark.slow
def test_orpo_chains_from_an_sft_run(tmp_path, tiny_model_dir, pref_file):
    from tests.helpers import QA
    from tunekit.stages.orpo import run_orpo
    from tunekit.stages.sft import run_sft

    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    sft = run_sft(load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={qa}", f"output={tmp_path / 's'}",
                                     "train.max_steps=1", "train.batch_size=2", "train.save_steps=0",
                                     "generate.samples=0"]))
    res = run_orpo(load_recipe(None, [f"model.name={sft.path}", f"data.train={pref_file}", f"output={tmp_path / 'o'}",
                                      "train.max_steps=1", "train.batch_size=2", "train.save_steps=0",
                                      "generate.samples=0"], defaults={"stage": "orpo"}))
    card = json.loads((res.path / "run_card.json").read_text())
    assert card["chained_from"][0]["path"] == str(sft.path)
