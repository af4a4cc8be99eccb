"""`tunekit eval`: perplexity equals exp(mean assistant-token NLL), exact match, run directories as targets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.data.templates import tokenize_conversation
from tunekit.evaluation.score import evaluate, perplexity


def test_perplexity_is_exp_of_hf_loss_on_assistant_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    conv = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    t = tokenize_conversation(tok, conv, 512)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([t.input_ids]), labels=torch.tensor([t.labels])).loss.item()
    nll, n = perplexity(model, tok, [conv])
    assert n == sum(label != -100 for label in t.labels[1:]) and abs(nll - hf) < 1e-5
    # two conversations of different lengths in one padded batch: token-weighted mean of the two
    conv2 = [{"role": "user", "content": "Say a long thing."}, {"role": "assistant", "content": "One two three four."}]
    nll2, n2 = perplexity(model, tok, [conv2])
    both, nb = perplexity(model, tok, [conv, conv2])
    assert nb == n + n2 and abs(both - (nll * n + nll2 * n2) / (n + n2)) < 1e-5
    res = evaluate(model, tok, [conv], max_new_tokens=3)
    assert abs(res["perplexity"] - math.exp(nll)) < 1e-4 and res["exact_match"] in (0.0, 1.0)


def test_eval_cli_on_run_and_model(tmp_path, tiny_model_dir):
    from tunekit.config import load_recipe
    from tunekit.stages.sft import run_sft

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    run = run_sft(load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={data}", f"output={tmp_path / 'r'}",
                                     "train.max_steps=2", "train.save_steps=0", "generate.samples=0"])).path
    for target in (run, run / "adapter", tiny_model_dir):
        res = run_cli("eval", target, "--data", data, "--max-new-tokens", "4", "-o", tmp_path / "out.json",
                      "--overwrite")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        metrics = summary["metrics"]
        assert summary["mode"] == "perplexity" and summary["n"] == len(QA) and summary["target"] == str(target)
        assert metrics["perplexity"]["value"] > 1 and 0 <= metrics["exact_match"]["value"] <= 1
        lo, hi = metrics["exact_match"]["ci"]  # Wilson interval around the share
        assert 0 <= lo <= metrics["exact_match"]["value"] <= hi <= 1
        full = json.loads((tmp_path / "out.json").read_text())
        assert full["metrics"] == metrics and "details" not in summary
        assert len(full["details"]) == len(QA) and full["details"][0]["reference"] == QA[0]["output"]


def test_offline_hub_ids_fail_cleanly(tmp_path, tiny_model_dir):
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", "data.train=nobody/no-such-dataset",
                  "--output", tmp_path / "run")
    assert res.returncode == 2 and "cannot load dataset 'nobody/no-such-dataset'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
    res = run_cli("eval", "nobody/no-such-model", "--data", write_jsonl(tmp_path / "d.jsonl", QA[:1]))
    assert res.returncode == 2 and "model 'nobody/no-such-model' not found" in res.stderr  # the shared resolver
    assert "HF_HUB_OFFLINE is set" in res.stderr


def test_completion_logps_sum_the_completions_token_logprobs(tiny_model_dir, monkeypatch):
    """completion_logps = Σ_{t ≥ start} log softmax(z_{t−1})[y_t] per pair, in one padded batch: on the chunked
    head (training's token_logprobs) and on the full logits of a model the chunked head cannot take."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.evaluation.preference import completion_logps, conversation_ids
    from tunekit.training import trainer as trainer_module

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [[{"role": "user", "content": "Capital of France?"}], [{"role": "user", "content": "Say a long thing."}]]
    answers = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "One two three four."}]]
    want = []
    for p, a in zip(prompts, answers):
        ids, start = conversation_ids(tok, p, a, 1024)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        want.append(logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)[start - 1 :].sum().item())
    assert trainer_module.causal_lm_parts(model) is not None
    assert completion_logps(model, tok, prompts, answers) == pytest.approx(want, abs=1e-4)
    monkeypatch.setattr(trainer_module, "causal_lm_parts", lambda m: None)
    assert completion_logps(model, tok, prompts, answers) == pytest.approx(want, abs=1e-4)
