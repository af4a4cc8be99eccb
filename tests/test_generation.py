"""The shared sampler: left padding gives the same greedy answers as one prompt at a time; EOS cuts rows."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_batched_greedy_equals_one_at_a_time(tiny):
    from tunekit.generation import sample

    model, tok = tiny
    prompts = ["hi", "The quick brown fox jumps over", [{"role": "user", "content": "Count: 1 2 3"}]]
    batch = sample(model, tok, prompts, max_new_tokens=6, temperature=0)
    assert batch.prompt_ids.shape[0] == 3 and batch.prompt_mask[0].sum() < batch.prompt_mask[1].sum()
    assert batch.prompt_mask[0, 0] == 0  # left padded
    for i, p in enumerate(prompts):
        one = sample(model, tok, [p], max_new_tokens=6, temperature=0)
        n = int(one.response_mask[0].sum())
        assert batch.response_ids[i, :n].tolist() == one.response_ids[0, :n].tolist()


def test_samples_per_prompt_are_consecutive_and_seeded(tiny):
    from tunekit.generation import sample

    model, tok = tiny
    a = sample(model, tok, ["hi", "bye"], max_new_tokens=5, temperature=1.0, num_samples=3, seed=7)
    b = sample(model, tok, ["hi", "bye"], max_new_tokens=5, temperature=1.0, num_samples=3, seed=7)
    assert a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert a.response_ids.tolist() == b.response_ids.tolist()
    assert a.texts == b.texts and len(a.texts) == 6


def test_rows_are_cut_after_the_first_eos():
    import torch

    from tunekit.generation import _cut_at_eos

    rows = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 9, 9, 9, 9]])
    ids, mask, finished = _cut_at_eos(rows, [2], pad_id=0)
    assert ids.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]
