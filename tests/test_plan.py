"""The memory planner against hand-computed values (public 7B/8B/0.5B configs, meta device only), the
activation formula against the tensors autograd really saves, and the `tunekit plan` command."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_cli
from tunekit.config import load_recipe
from tunekit.launch import plan as P

# Public config.json values (hub model cards), written to a folder so the planner reads them like a real model.
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "use_sliding_window": False,
}
MISTRAL_PARAMS = 7_241_732_096  # 2·32000·4096 + 32·(2·4096² + 2·4096·1024 + 3·4096·14336 + 2·4096) + 4096
MISTRAL_LINEAR = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # what bitsandbytes quantizes


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    out = {}
    for name, cfg in (("mistral-7b", MISTRAL_7B), ("llama3-8b", LLAMA3_8B), ("qwen2.5-0.5b", QWEN25_05B)):
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(cfg))
        out[name] = folder
    return out


def _recipe(folder, *sets):
    return load_recipe(None, [f"model.name={folder}", *sets])


@pytest.fixture(scope="module")
def mistral_shape(configs):
    from tunekit.models.load import build_meta_model

    return P.shape_of(build_meta_model(_recipe(configs["mistral-7b"]).model))


def test_shapes_match_the_published_parameter_counts(configs, mistral_shape):
    from tunekit.models.load import build_meta_model

    assert mistral_shape.total_params == MISTRAL_PARAMS
    assert mistral_shape.quantizable_params == MISTRAL_LINEAR
    assert mistral_shape.layer_params == 218_112_000 and mistral_shape.kv_dim == 1024
    llama = P.shape_of(build_meta_model(_recipe(configs["llama3-8b"]).model))
    assert llama.total_params == 8_030_261_248
    qwen = P.shape_of(build_meta_model(_recipe(configs["qwen2.5-0.5b"]).model))
    assert qwen.total_params == 494_032_768  # tied embeddings counted once
    assert qwen.embed_params == 151936 * 896


def test_adapter_count_is_the_dry_run_count(configs):
    # LoRA r=16 on all 7 linears of a Mistral layer: r·(d_in + d_out) each, 32 layers
    per_layer = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert P.count_adapter(_recipe(configs["mistral-7b"], "adapter.r=16")) == 32 * per_layer == 41_943_040
    res = run_cli("sft", "--dry-run", "--set", f"model.name={configs['mistral-7b']}", "--set", "adapter.r=16")
    assert res.returncode == 0, res.stderr
    assert "trainable parameters: 41943040" in res.stdout


def test_zero_partitioning_of_a_7b_full_finetune_on_8_gpus(mistral_shape):
    """ZeRO §5: stage 1 = 2Ψ + 2Ψ + 12Ψ/P, stage 2 = 2Ψ + 14Ψ/P, stage 3 = 16Ψ/P (bf16 + fp32 Adam)."""
    psi = MISTRAL_PARAMS
    bucket = 50_000_000 * 2  # one bf16 reduce bucket of our DeepSpeed JSON
    gathered = 2 * 218_112_000 * 2  # two bf16 decoder layers gathered at a time (larger than the embedding)
    expect = {
        "ddp": (2 * psi, 2 * psi, 4 * psi),  # pure bf16 Trainer: m, v in bf16
        "zero1": (2 * psi, 2 * psi + bucket, 12 * psi / 8),
        "zero2": (2 * psi, 2 * psi / 8 + bucket, 12 * psi / 8),
        "zero3": (2 * psi / 8 + gathered, 2 * psi / 8 + bucket, 12 * psi / 8),
        "fsdp2": (4 * psi / 8 + gathered, 4 * psi / 8, 12 * psi / 8),  # FSDP2 upcasts trainable params to fp32
    }
    for strategy, (weights, grads, optim) in expect.items():
        s = P.Setup(method="none", trainable_params=psi, strategy=strategy, gpus=8, micro_batch=1, seq_len=2048)
        plan = P.estimate_setup(mistral_shape, s, 80 * P.GiB)
        assert plan.row("weights") == pytest.approx(weights), strategy
        assert plan.row("gradients") == pytest.approx(grads), strategy
        assert plan.row("optimizer") == pytest.approx(optim), strategy
    # the famous numbers: 16Ψ/8 = 14.5 GB of model states per GPU under ZeRO-3
    z3 = P.estimate_setup(mistral_shape, P.Setup(method="none", trainable_params=psi, strategy="zero3", gpus=8),
                          80 * P.GiB)
    assert (z3.row("weights") - gathered) + (z3.row("gradients") - bucket) + z3.row("optimizer") == 16 * psi / 8
    off = P.estimate_setup(mistral_shape, P.Setup(method="none", trainable_params=psi, strategy="zero3_offload",
                                                  gpus=8), 80 * P.GiB)
    assert off.row("optimizer") == 0 and off.row("weights") == gathered
    assert off.host_bytes == pytest.approx((2 * psi + 4 * psi + 12 * psi) / 8)  # params, fp32 grads, Adam


def test_nf4_weights_with_block_scales_and_double_quant(mistral_shape):
    q, rest = MISTRAL_LINEAR, MISTRAL_PARAMS - MISTRAL_LINEAR
    dq = P.weight_bytes(mistral_shape, "nf4", 2, double_quant=True)
    assert dq == q / 2 + q / 64 * (1 + 4 / 256) + 2 * rest == 4_125_237_248
    plain = P.weight_bytes(mistral_shape, "nf4", 2, double_quant=False)
    assert plain == q / 2 + q * 4 / 64 + 2 * rest
    # QLoRA §3: double quantization cuts the scale overhead from 0.5 to 0.127 bits per parameter
    assert (plain - q / 2 - 2 * rest) * 8 / q == pytest.approx(0.5)
    assert (dq - q / 2 - 2 * rest) * 8 / q == pytest.approx(0.127, abs=5e-4)
    int8 = P.weight_bytes(mistral_shape, "int8", 2)
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)
    assert int8 == q + 4 * rows + 2 * rest


def test_activations_with_and_without_checkpointing(configs):
    from tunekit.models.load import build_meta_model

    qwen = P.shape_of(build_meta_model(_recipe(configs["qwen2.5-0.5b"]).model))
    h, i, kv, heads, L, V, s = 896, 4864, 128, 14, 24, 151936, 1024
    per_layer = 2 * (6 * h + 2 * kv + 4 * i) + 8 * h + 4 * heads  # bf16 saved tensors + fp32 norm copies
    assert per_layer == 57_400
    setup = P.Setup(method="none", trainable_params=qwen.total_params, micro_batch=2, seq_len=s)
    decoder, logits = P.activation_bytes(qwen, setup)
    assert decoder == 2 * s * (L * per_layer + 8 * h)
    assert logits == 2 * s * V * 12
    ckpt, _ = P.activation_bytes(qwen, P.Setup(method="none", trainable_params=1, micro_batch=2, seq_len=s,
                                               checkpointing=True))
    assert ckpt == 2 * s * (L * 2 * h + per_layer + 8 * h)  # one hidden state per layer + one recomputed layer
    assert decoder / ckpt > 10
    dpo, _ = P.activation_bytes(qwen, P.Setup(method="none", micro_batch=2, seq_len=s, stage="dpo"))
    assert dpo == 2 * decoder  # chosen + rejected


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward with labels."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("method,dtype,dropout", [
    ("none", torch.bfloat16, 0.0), ("none", torch.float32, 0.0), ("lora", torch.bfloat16, 0.05),
    ("lora", torch.bfloat16, 0.0), ("lora", torch.float32, 0.05), ("lora", torch.float32, 0.0)])
def test_activation_formula_matches_what_autograd_saves(method, dtype, dropout):
    """A Qwen2-shaped random model: the planner's count within 10% of the tensors autograd really keeps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    trainable = sum(p.numel() for p in model.parameters())
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    b, s = 2, 128
    measured = _saved_bytes(model, torch.randint(0, 4096, (b, s)))
    shape = P.shape_of(model.get_base_model() if method == "lora" else model)
    setup = P.Setup(method=method, trainable_params=trainable, dtype_bytes=dtype.itemsize, micro_batch=b, seq_len=s,
                    lora_dropout=dropout > 0, adapter_rank=8,
                    dropout_mask_bytes=4)  # the CPU dropout kernel keeps its mask in the input's dtype
    decoder, _ = P.activation_bytes(shape, setup)
    saved_logits = b * s * cfg.vocab_size * 4  # log_softmax keeps fp32 log-probs; the rest of `logits` is transient
    assert (decoder + saved_logits) == pytest.approx(measured, rel=0.10)


def test_recommendation_is_the_fastest_setup_that_fits(configs):
    recipe = _recipe(configs["llama3-8b"], "adapter.method=none", "data.max_length=2048", "train.batch_size=4",
                     "train.grad_accum=2")
    one = P.estimate(recipe, "24GiB")
    assert not one.fits  # 8B full fine-tune: 16 GB of bf16 weights + states + activations
    rec = one.recommendation
    # only ZeRO-3 offload keeps a full 8B fine-tune on one 24 GiB GPU: params, grads and Adam live in host RAM
    assert rec is not None and rec.fits and rec.setup.method == "none" and rec.setup.strategy == "zero3_offload"
    assert rec.host_bytes == pytest.approx(18 * 8_030_261_248)
    assert rec.setup.micro_batch * rec.setup.grad_accum == 8  # the global batch is kept
    # no other fitting candidate that trains the same thing is faster
    for c in P.candidates(one.setup, None):
        p = P.estimate_setup(one.shape, c, one.gpu_mem)
        if p.fits:
            assert P.relative_step_time(c) >= P.relative_step_time(rec.setup)
    eight = P.estimate(recipe, "80GB", gpus=8)
    assert eight.recommendation.setup.method == "none" and eight.recommendation.setup.strategy != "ddp"
    assert eight.recommendation.peak <= 0.9 * 80e9


def test_zero3_with_a_4bit_base_is_refused_with_the_alternative(configs):
    recipe = _recipe(configs["mistral-7b"], "model.load_in_4bit=true")
    plan = P.estimate(recipe, "24GiB", gpus=2, strategy="zero3")
    assert not plan.fits and "fsdp2" in plan.refused
    assert plan.recommendation.setup.strategy != "zero3"
    fsdp = P.estimate(recipe, "24GiB", gpus=2, strategy="fsdp2")
    assert fsdp.refused is None and any("quant_storage" in n for n in fsdp.notes)


def test_reference_and_value_models_of_alignment_stages(mistral_shape):
    base = dict(trainable_params=MISTRAL_PARAMS, method="none", micro_batch=1, seq_len=512)
    dpo = P.estimate_setup(mistral_shape, P.Setup(stage="dpo", **base), 80 * P.GiB)
    assert dpo.row("reference/value") == 2 * MISTRAL_PARAMS  # frozen bf16 reference copy
    lora_dpo = P.estimate_setup(mistral_shape, P.Setup(stage="dpo", trainable_params=1000), 80 * P.GiB)
    assert lora_dpo.row("reference/value") == 0  # reference = the base with the adapter disabled
    ppo = P.estimate_setup(mistral_shape, P.Setup(stage="ppo", trainable_params=1000), 80 * P.GiB)
    assert ppo.row("reference/value") == 2 * P.weight_bytes(mistral_shape, "none", 2)


def test_plan_command_prints_the_table_and_applies_the_recommendation(tmp_path, configs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: {configs['qwen2.5-0.5b']}\nadapter:\n  method: none\n"
                      "data:\n  max_length: 4096\ntrain:\n  batch_size: 8\n")
    out = tmp_path / "fit.yaml"
    res = run_cli("plan", recipe, "--gpu-mem", "16GiB", "--apply", out)
    assert res.returncode == 0, res.stderr
    for word in ("weights", "optimizer", "activations", "logits + loss", "peak", "recommended:"):
        assert word in res.stdout, word
    applied = load_recipe(out)
    assert applied.model.name == str(configs["qwen2.5-0.5b"])
    assert applied.train.batch_size * applied.train.grad_accum == 8
    shape_plan = P.estimate(applied, "16GiB", recommend_fit=False)
    assert shape_plan.fits  # the written recipe is the one that fits
    bad = run_cli("plan", recipe, "--gpu-mem", "lots")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --gpu-mem 'lots'")
    assert len(bad.stderr.strip().splitlines()) == 1
