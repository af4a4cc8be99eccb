"""PPO's networks and rollouts on a real tiny Llama with real PEFT adapters: masking of prompt and padding,
the adapter-off reference, one copy of the base weights, rollout bookkeeping, checkpoint/resume."""

from __future__ import annotations

import pytest
import torch

from tests.ppo_helpers import PROMPTS, build, one_thread, vowel_share  # noqa: F401  (one_thread: fixture)
from tunekit.config.schema import ModelConfig
from tunekit.models.load import load_model, load_tokenizer
from tunekit.ppo import algorithm as alg
from tunekit.ppo.config import PPOConfig
from tunekit.ppo.models import Reference
from tunekit.ppo.rollout import collect
from tunekit.ppo.trainer import PPOTrainer


def perturb_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_padded_batch_scores_only_response_tokens_like_each_row_alone(tiny_model_dir):
    tok, pv, _ = build(tiny_model_dir)
    perturb_adapter(pv)
    pv.value_head.summary.weight.data.normal_(0, 1.0)  # non-zero values so their alignment is tested too
    pad = tok.pad_token_id
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("Say hello.", "Hi")]
    responses = [[40, 41, 42], [50, 51]]
    P, T = max(map(len, prompts)), max(map(len, responses))
    seq = torch.full((2, P + T), pad)
    att = torch.zeros(2, P + T, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p) : P] = torch.tensor(p)  # left-padded prompt
        seq[i, P : P + len(r)] = torch.tensor(r)  # right-padded response
        att[i, P - len(p) : P + len(r)] = 1
    out = pv(seq, att, P, temperature=0.7, with_values=True, with_entropy=True)
    assert out.logprobs.shape == (2, T) and out.values.shape == (2, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone = torch.tensor([p + r])
        logits = pv.policy(input_ids=alone).logits[0] / 0.7
        hidden = pv.policy(input_ids=alone, output_hidden_states=True).hidden_states[-1][0]
        for t, token in enumerate(r):  # response token t is predicted at position len(p) − 1 + t
            expected = torch.log_softmax(logits[len(p) - 1 + t], -1)[token]
            assert out.logprobs[i, t].item() == pytest.approx(expected.item(), abs=1e-4)
            assert out.values[i, t].item() == pytest.approx(pv.value_head(hidden[len(p) - 1 + t]).item(), abs=1e-4)


def test_reference_is_the_base_with_the_adapter_off(tiny_model_dir):
    tok, pv, mc = build(tiny_model_dir)
    perturb_adapter(pv)
    ref = Reference.for_policy(pv.policy, "lora")
    seq = torch.tensor([tok("Say hello. Hello!", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(seq)
    base = load_model(mc, tok)
    base_lp = alg.logprobs_of(base(input_ids=seq).logits[:, 2:-1], seq[:, 3:])
    ref_lp = ref.logprobs(seq, att, 3, temperature=1.0)
    assert torch.allclose(ref_lp, base_lp, atol=1e-5)
    policy_lp = pv(seq, att, 3, with_values=False).logprobs
    assert (policy_lp - ref_lp).abs().max() > 1e-2  # the adapter is back on after the reference pass


def test_lora_policy_with_shared_value_head_holds_one_copy_of_the_base(tiny_model_dir):
    def storage_bytes(*modules):
        seen = {}
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    mc = ModelConfig(name=str(tiny_model_dir))
    base_bytes = storage_bytes(load_model(mc, load_tokenizer(mc)))
    _, pv, _ = build(tiny_model_dir, "lora")
    ref = Reference.for_policy(pv.policy, "lora")
    assert ref.copy is None
    lora_bytes = storage_bytes(pv, *([ref.copy] if ref.copy is not None else []))
    adapter_bytes = sum(p.numel() * p.element_size() for p in pv.parameters() if p.requires_grad)
    assert lora_bytes == pytest.approx(base_bytes + adapter_bytes, rel=0.01)
    _, full, _ = build(tiny_model_dir, "none")  # a full policy needs its frozen copy: two sets of weights
    full_ref = Reference.for_policy(full.policy, "none")
    assert storage_bytes(full, full_ref.copy) > 1.9 * base_bytes


def test_collect_bookkeeping(tiny_model_dir):
    tok, pv, _ = build(tiny_model_dir)
    ref = Reference.for_policy(pv.policy, "lora")
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=5, kl_coef=0.1, whiten_advantages=False)
    exp = collect(pv, ref, tok, PROMPTS, vowel_share, cfg, kl_coef=0.1, forward_batch=3, seed=0)
    assert exp.size == 8 and exp.mask.shape[1] <= 5
    assert exp.prompts == [p for p in PROMPTS for _ in range(2)]
    assert exp.raw_scores.tolist() == pytest.approx(vowel_share(None, exp.texts))
    # freshly attached LoRA (B = 0) is the reference: zero KL, so rewards are the score on the last token
    assert torch.allclose(exp.logprobs, exp.ref_logprobs, atol=1e-5)
    assert exp.kl.abs().max() < 1e-5
    assert torch.allclose(exp.rewards.sum(1), exp.scores, atol=1e-5)
    # the zero-initialised value head predicts 0, so with γ = 1, λ = .95 the advantages are λ-discounted scores
    lengths = exp.mask.sum(1).long()
    for i in range(exp.size):
        n = int(lengths[i])
        expected = [exp.scores[i].item() * 0.95 ** (n - 1 - t) for t in range(n)]
        assert exp.advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert exp.advantages[i, n:].abs().sum() == 0


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, epochs=2, minibatch_size=2,
                    target_kl=1.0, kl_coef=0.1)

    def trainer():
        tok, pv, _ = build(tiny_model_dir)
        return PPOTrainer(pv, Reference.for_policy(pv.policy, "lora"), tok, PROMPTS, vowel_share, cfg,
                          steps=2, lr=1e-2, seed=3, forward_batch=2)

    straight = trainer().train()
    first = trainer()
    first.step()
    first.save_checkpoint(tmp_path / "checkpoint-1")
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "checkpoint-1")
    assert resumed.step_count == 1 and resumed.kl_ctl.value == first.kl_ctl.value != 0.1
    second = resumed.step()
    for key in ("reward", "kl", "policy_loss", "value_loss", "kl_coef"):
        assert second[key] == pytest.approx(straight[1][key], abs=1e-5), key
