"""The chunked linear + cross-entropy equals the plain path: against torch's own functions on hand-made
tensors (float64, bias, temperature, chunk sizes that split rows unevenly), and through `TunekitTrainer` on the
tiny Llama (LoRA and full fine-tuning, padded and packed batches): loss and every trainable gradient to 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

from tunekit.training.loss import chunked_cross_entropy, token_logprobs


def _tensors(n=37, h=8, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    return hidden, weight, bias, labels


def _grads(*ts):
    out = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


def test_hand_computed_cross_entropy():
    """Two rows, vocabulary 2, weight = identity: logits are the hidden states themselves."""
    hidden = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    weight = torch.eye(2)
    labels = torch.tensor([0, 1])
    loss = chunked_cross_entropy(hidden, weight, labels, chunk=1)
    # row 0: -log(1/2); row 1: p(1) = 1/(3+1) -> -log(1/4); mean = (log 2 + log 4) / 2 = 1.5 log 2
    assert loss.item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    loss.backward()
    # d/dz = (softmax - onehot) / 2
    expect = torch.tensor([[-0.25, 0.25], [0.375, -0.375]])
    assert torch.allclose(hidden.grad, expect, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_cross_entropy_equals_torch(chunk):
    hidden, weight, bias, labels = _tensors()
    n = int((labels != -100).sum())
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, labels, reduction="sum") / (n + 3)
    (ref * 0.5).backward()
    want = _grads(hidden, weight, bias)
    got = chunked_cross_entropy(hidden, weight, labels, bias=bias, num_items=n + 3, chunk=chunk)
    (got * 0.5).backward()
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(hidden, weight, bias), want):
        assert (a - b).abs().max() < 1e-12
    # default divisor: the number of labelled positions (the mean)
    mean = chunked_cross_entropy(hidden.detach(), weight.detach(), labels, bias=bias.detach())
    assert mean.item() == pytest.approx(ref.item() * (n + 3) / n, rel=1e-12)


def test_chunked_cross_entropy_fp32_against_plain_logits():
    hidden, weight, bias, labels = (t.detach().float() if t.is_floating_point() else t for t in _tensors(seed=3))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels)
    ref.backward()
    want = _grads(hidden, weight)
    got = chunked_cross_entropy(hidden, weight, labels, chunk=4)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-5
    for a, b in zip(_grads(hidden, weight), want):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_log_softmax(temperature):
    hidden, weight, bias, labels = _tensors(seed=1)
    upstream = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    keep = labels != -100
    ref = torch.log_softmax((hidden @ weight.t() + bias) / temperature, -1).gather(1, labels.clamp(min=0)[:, None])
    ref = ref.squeeze(1) * keep
    (ref * upstream).sum().backward()
    want = _grads(hidden, weight, bias)
    got = token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, chunk=6)
    (got * upstream).sum().backward()
    assert got.shape == labels.shape and bool((got[~keep] == 0).all())
    assert (got - ref).abs().max() < 1e-12
    for a, b in zip(_grads(hidden, weight, bias), want):
        assert (a - b).abs().max() < 1e-12


def test_token_logprobs_gradcheck():
    hidden, weight, _, labels = _tensors(n=9, h=4, v=7, seed=2)
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, labels, chunk=2), (hidden, weight))


def test_no_labelled_position_gives_zero_loss_and_gradient():
    hidden, weight, _, labels = _tensors()
    loss = chunked_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and bool((hidden.grad == 0).all())


# ---- through the Trainer on the tiny model ---------------------------------------------------------------


def _trainer(model, loss_impl, tmp_path):
    from transformers import TrainingArguments

    from tunekit.training.trainer import TunekitTrainer

    args = TrainingArguments(output_dir=str(tmp_path / loss_impl), use_cpu=True, report_to="none",
                             per_device_train_batch_size=2)
    return TunekitTrainer(model=model, args=args, loss_impl=loss_impl)


def _batches(tok, packed: bool):
    from tunekit.data.collate import SFTCollator

    rows = []
    for q, a in [("Say hello.", "Hello there!"), ("Add 2 and 3.", "5"), ("Capital of France?", "Paris, of course.")]:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        from tunekit.data.templates import tokenize_conversation

        t = tokenize_conversation(tok, msgs, 64)
        rows.append({"input_ids": t.input_ids, "labels": t.labels})
    if packed:
        row = {"input_ids": sum((r["input_ids"] for r in rows), []), "labels": sum((r["labels"] for r in rows), []),
               "seq_lengths": [len(r["input_ids"]) for r in rows]}
        return SFTCollator(tok.pad_token_id, padding_free=True)([row])
    return SFTCollator(tok.pad_token_id)(rows)


def _loss_and_grads(trainer, model, batch, num_items):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "none"])
@pytest.mark.parametrize("packed", [False, True])
def test_trainer_chunked_equals_plain_on_tiny_model(tiny_model_dir, tmp_path, method, packed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.adapters import AttachContext, attach
    from tunekit.config.schema import AdapterConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = attach(model, AdapterConfig(method=method, dropout=0.0), AttachContext())
    if method == "lora":  # B starts at zero; move it so the adapter's gradients are not trivially related
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = _batches(tok, packed)
    num_items = int((batch["labels"][:, 1:] != -100).sum()) + 2  # as with gradient accumulation: a larger n
    plain_loss, plain = _loss_and_grads(_trainer(model, "plain", tmp_path), model, batch, num_items)
    chunked_trainer = _trainer(model, "chunked", tmp_path)
    assert chunked_trainer._parts is not None
    loss, grads = _loss_and_grads(chunked_trainer, model, batch, num_items)
    assert abs(loss.item() - plain_loss.item()) < 1e-5
    assert grads.keys() == plain.keys() and len(grads) > 0
    for name, g in grads.items():
        assert (g - plain[name]).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("zero3", [False, True])
def test_zero3_is_decided_at_the_first_loss_only(tiny_model_dir, tmp_path, monkeypatch, zero3):
    """Whether the chunked loss steps aside for ZeRO-3 is asked once (at the first loss, when DeepSpeed has
    partitioned the model), not at every step; under ZeRO-3 every step takes the plain loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.launch import ranks
    from tunekit.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(ranks, "zero3_partitioned", lambda model: calls.append(model) or zero3)
    if zero3:  # the chunked path must not run at all
        monkeypatch.setattr(trainer_module, "decoder_hidden_states", lambda *a, **k: pytest.fail("chunked path"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = _trainer(model, "chunked", tmp_path)
    batch = _batches(tok, packed=False)
    losses = [trainer.compute_loss(model, dict(batch)).item() for _ in range(3)]
    assert len(calls) == 1 and trainer._parts is not None
    assert max(losses) - min(losses) < 1e-6


def test_packed_rows_equal_each_sequence_alone(tiny_model_dir):
    """Per-sequence attention: each packed sequence gets the token log-probs it has alone, and no dense mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.training.attention import packed_attention
    from tunekit.training.trainer import causal_lm_parts, decoder_hidden_states

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    decoder, head = causal_lm_parts(model)
    packed = _batches(tok, packed=True)
    with torch.no_grad(), packed_attention(model) as active:
        assert active
        hidden, _ = decoder_hidden_states(model, decoder, {k: v for k, v in packed.items() if k != "labels"})
        got = token_logprobs(hidden[:, :-1], head.weight, packed["input_ids"][:, 1:])[0]
    assert model.config._attn_implementation == "sdpa"  # restored
    pos = packed["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    assert len(starts) == 4
    for s, e in zip(starts, starts[1:]):
        ids = packed["input_ids"][:, s:e]
        with torch.no_grad():
            alone = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = alone.gather(1, ids[0, 1:, None]).squeeze(1)
        assert (got[s : e - 1] - want).abs().max() < 1e-5


@pytest.mark.parametrize("loss_impl", ["chunked", "plain"])
def test_packed_training_step_with_gradient_checkpointing(tiny_model_dir, tmp_path, loss_impl):
    """Gradient checkpointing recomputes each layer inside the backward: a packed row's training step must run the
    per-sequence attention there too (it crashed with CheckpointError when only the forward was wrapped), and
    give the gradients of the step without checkpointing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _batches(tok, packed=True)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainer = _trainer(model, loss_impl, tmp_path)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); the step is called directly here
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, dict(batch))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.config._attn_implementation == "sdpa"  # restored after the step
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max().item() < 1e-5, name


@pytest.mark.slow
@pytest.mark.embedded
def test_trainer_chunked_equals_plain_on_smollm2(tmp_path):
    """The embedded SmolLM2-135M (49,152-token vocabulary, tied embeddings, 30 layers) with LoRA: the chunked
    loss and its gradients equal full-logits cross-entropy, padded and packed. In float64: transformers' own
    loss upcasts/downcasts logits to fp32 (`logits.float()`), whose rounding, carried back through 30 layers,
    differs by ~5e-5 (relative) at layer 0 and would hide a real error; the reference here is the same
    full-vocabulary cross-entropy in float64."""
    from tunekit.adapters import AttachContext, attach
    from tunekit.config.schema import AdapterConfig, ModelConfig
    from tunekit.models.load import load_model, load_tokenizer
    from tunekit.training.attention import packed_attention

    torch.manual_seed(0)
    cfg = ModelConfig(name="smollm2-135m", dtype="float32")
    tok = load_tokenizer(cfg)
    model = attach(load_model(cfg, tok).double(), AdapterConfig(method="lora", r=4, dropout=0.0,
                                                                targets=["q_proj", "v_proj"]), AttachContext())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.double().train()
    for packed in (False, True):
        batch = _batches(tok, packed)
        labels = batch["labels"]
        num_items = int((labels[:, 1:] != -100).sum())
        model.zero_grad(set_to_none=True)
        with packed_attention(model):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert logits.dtype == torch.float64
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                labels[:, 1:].reshape(-1), reduction="sum") / num_items
        ref.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        del logits
        loss, grads = _loss_and_grads(_trainer(model, "chunked", tmp_path), model, batch, num_items)
        assert abs(loss.item() - ref.item()) < 1e-10, (packed, loss, ref)
        for name, g in grads.items():
            assert (g - want[name]).abs().max().item() < 1e-9, (packed, name)
