"""The reward_model reward: a `tunekit rm`-style run built by hand (tiny LlamaForSequenceClassification + PEFT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tunekit.errors import TunekitError
from tunekit.rewards import get_reward
from tunekit.rewards.reward_model import load_reward_model, render_pairs, reward_scores

PROMPTS = ["What is the capital of France?", [{"role": "user", "content": "Say hello."}], "Add 2 and 3."]
COMPLETIONS = ["The capital of France is Paris.", [{"role": "assistant", "content": "Hello!"}], "5"]


def _seq_cls(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def rm_runs(tiny_model_dir, tmp_path_factory):
    """An adapter rm run and a full-model rm run, as `tunekit rm` writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    root = tmp_path_factory.mktemp("rm")
    peft_model = get_peft_model(_seq_cls(tiny_model_dir), LoraConfig(task_type="SEQ_CLS", r=4,
                                                                     target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B != 0, and a score head different from the base's init
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.5)
    peft_model.eval()
    adapter_run = root / "rm-adapter"
    peft_model.save_pretrained(str(adapter_run / "adapter"))
    tok.save_pretrained(str(adapter_run / "adapter"))
    recipe = {"stage": "rm", "model": {"name": str(tiny_model_dir)}}
    (adapter_run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    full = _seq_cls(tiny_model_dir)
    full.config.pad_token_id = tok.pad_token_id
    full_run = root / "rm-full"
    full.save_pretrained(str(full_run / "model"))
    tok.save_pretrained(str(full_run / "model"))
    (full_run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"adapter": (adapter_run, peft_model), "full": (full_run, full), "tok": tok}


def _one_by_one(model, tok, texts):
    """Reference scores: each text alone (no padding), the head's output at the last token."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_reloaded_reward_model_scores_like_the_trained_one(rm_runs, kind):
    run, trained = rm_runs[kind]
    model, tok = load_reward_model(run)
    texts = render_pairs(tok, PROMPTS, COMPLETIONS)
    # rendered with the RM's own chat template (ChatML here), prompt strings as user turns
    assert texts[0] == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    expected = _one_by_one(trained, rm_runs["tok"], texts)
    assert len(set(round(x, 4) for x in expected)) == 3  # the pairs get different rewards
    for batch_size in (1, 3):  # padding inside a batch changes nothing
        assert reward_scores(model, tok, PROMPTS, COMPLETIONS, batch_size=batch_size) == pytest.approx(
            expected, abs=1e-4)


def test_reward_model_reward_in_trl_convention(rm_runs):
    run, trained = rm_runs["adapter"]
    fn = get_reward("reward_model", path=str(run), batch_size=2)
    assert fn.__name__ == "reward_model"
    out = fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=None, trainer_state=None, answer=[1, 2, 3])
    expected = _one_by_one(trained, rm_runs["tok"], render_pairs(rm_runs["tok"], PROMPTS, COMPLETIONS))
    assert out == pytest.approx(expected, abs=1e-4)
    # the run's adapter folder works as well as the run
    model, tok = load_reward_model(run / "adapter")
    assert reward_scores(model, tok, PROMPTS[:1], COMPLETIONS[:1]) == pytest.approx(expected[:1], abs=1e-4)


def test_reward_model_refuses_what_is_not_one(rm_runs, tmp_path, tiny_model_dir):
    with pytest.raises(TunekitError, match="is not a folder"):
        load_reward_model(tmp_path / "missing")
    run, _ = rm_runs["full"]
    sft = tmp_path / "sft-run"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "config.json").write_text("{}")
    (sft / "recipe.yaml").write_text(yaml.safe_dump({"stage": "sft", "model": {"name": str(tiny_model_dir)}}))
    with pytest.raises(TunekitError, match="is a sft run, not a reward model"):
        load_reward_model(sft)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    causal = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                            LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    causal.save_pretrained(str(tmp_path / "lm-adapter"))
    with pytest.raises(TunekitError, match="is a CAUSAL_LM adapter; a reward model adapter has task_type SEQ_CLS"):
        load_reward_model(tmp_path / "lm-adapter")
