"""GGUF written by tunekit (gguf-py), checked with llama.cpp itself through llama-cpp-python."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunekit.errors import TunekitError
from tunekit.quantize.gguf_writer import iter_gguf_tensor_types, permute_qk, write_gguf

TEXTS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "Unicode: café, naïve, Ñandú, 東京, Привет, 😀 and ünïcödé ẞ.",
    "whitespace   runs\t\ttabs\n\n\n  new lines    and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>x<|pad|>",
    "def add(a, b):\n    return a + b  # 12345 67890",
]


@pytest.fixture(scope="module")
def f32_gguf(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_model_dir, path, "F32")
    return path


def _hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    )


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_metadata_and_tensor_names(f32_gguf):
    import gguf

    r = gguf.GGUFReader(str(f32_gguf))
    fields = {k: v.contents() for k, v in r.fields.items() if "tokens" not in k and "merges" not in k}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    names = {n for n, _, _ in iter_gguf_tensor_types(f32_gguf)}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names


def test_permute_qk_pairs_rotate_half_dims():
    d, heads = 8, 2
    w = np.arange(heads * d, dtype=np.float32)[:, None]
    p = permute_qk(w, heads)[:, 0]
    # head 0: rows (0,4),(1,5),(2,6),(3,7) become adjacent pairs
    assert p[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p[8:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_unsupported_architecture_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "gpt2like"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TunekitError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        write_gguf(bad, tmp_path / "x.gguf", "F16")


def test_tokenization_matches_hf(f32_gguf, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp

    tok, _ = _hf(tiny_model_dir)
    llm = llamacpp.load(f32_gguf, n_ctx=64, vocab_only=True)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Bonjour  ça va?"}, {"role": "assistant", "content": "Oui 😀"}],
        tokenize=False,
    )
    for text in [*TEXTS, chat]:
        assert llamacpp.tokenize(llm, text) == tok(text, add_special_tokens=False)["input_ids"], text


def test_f32_logits_match_hf(f32_gguf, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp

    tok, model = _hf(tiny_model_dir)
    llm = llamacpp.load(f32_gguf, n_ctx=128)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert np.abs(llamacpp.logits(llm, ids) - _hf_logits(model, ids)).max() < 1e-3


def test_q8_0_close_to_hf(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp

    path = tmp_path / "q8.gguf"
    write_gguf(tiny_model_dir, path, "Q8_0")
    types = {n: t for n, t, _ in iter_gguf_tensor_types(path)}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    tok, model = _hf(tiny_model_dir)
    llm = llamacpp.load(path, n_ctx=128)
    ids = tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:128]
    lq, lh = llamacpp.logits(llm, ids), _hf_logits(model, ids)
    assert np.abs(lq - lh).max() < 0.1 * np.abs(lh).max()
    assert (lq.argmax(-1) == lh.argmax(-1)).mean() > 0.9


def _tiny_arch(kind, folder):
    """A tiny random model of another supported architecture, with the tiny BPE tokenizer."""
    from transformers import AutoModelForCausalLM

    from tunekit.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if kind == "mistral":
        from transformers import MistralConfig as C
    elif kind == "qwen2":
        from transformers import Qwen2Config as C
    elif kind == "qwen3":
        from transformers import Qwen3Config as C
    elif kind == "gemma2":
        from transformers import Gemma2Config as C

        common.update(query_pre_attn_scalar=16, sliding_window=512, tie_word_embeddings=True)
    else:
        from transformers import Gemma3TextConfig as C

        common.update(query_pre_attn_scalar=16, sliding_window=512, tie_word_embeddings=True)
    cfg = C(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, so their conversion is tested
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_other_architectures_f32_logits_match_hf(kind, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp

    folder = _tiny_arch(kind, tmp_path / kind)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(folder, path, "F32")
    tok, model = _hf(folder)
    llm = llamacpp.load(path, n_ctx=128)
    ids = tok(TEXTS[0] + TEXTS[1], add_special_tokens=False)["input_ids"]
    # Gemma's GELU runs through ggml's fp16 lookup table on CPU (~1e-3 per activation); a wrong norm,
    # permutation or RoPE base moves logits by O(0.1-1).
    tol = 5e-3 if kind.startswith("gemma") else 1e-3
    assert np.abs(llamacpp.logits(llm, ids) - _hf_logits(model, ids)).max() < tol


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """Hidden 256 so that rows fill llama.cpp's 256-wide K-quant super-blocks."""
    from tunekit.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("t256") / "m", hidden_size=256, intermediate_size=512)


def test_k_quant_through_llama_cpp(tiny256, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp
    from tunekit.quantize.api import quantize

    out = tmp_path / "q4km.gguf"
    card = quantize(tiny256, "gguf", out, qtype="Q4_K_M", progress=False)
    assert card["quantizer"].startswith("llama.cpp")
    types = {t for n, t, _ in iter_gguf_tensor_types(out) if n.startswith("blk.")}
    assert "Q4_K" in types
    q6 = tmp_path / "q6k.gguf"
    quantize(tiny256, "gguf", q6, qtype="Q6_K", progress=False)
    tok, model = _hf(tiny256)
    ids = tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:128]
    lh = _hf_logits(model, ids)

    def rel_err(path):
        lq = llamacpp.logits(llamacpp.load(path, n_ctx=128), ids)
        return np.linalg.norm(lq - lh) / np.linalg.norm(lh)

    # random weights (std 0.1) make a 4-bit tiny model drift ~0.45 in relative L2; 6-bit ~4x less
    e4, e6 = rel_err(out), rel_err(q6)
    assert e6 < 0.5 * e4 and e4 < 0.6, (e4, e6)
    assert json.loads(out.with_name(out.name + ".card.json").read_text())["type"] == "Q4_K_M"


def test_k_quant_rows_narrower_than_256_fall_back(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize.api import quantize

    out = tmp_path / "q4km64.gguf"
    quantize(tiny_model_dir, "gguf", out, qtype="Q4_K_M", progress=False)
    types = {t for n, t, _ in iter_gguf_tensor_types(out) if n.endswith("attn_q.weight")}
    assert types and not types & {"Q4_K", "Q5_K", "Q6_K"}  # llama.cpp picks a 32-wide fallback type


def test_importance_matrix_reaches_llama_cpp(tiny256, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp
    from tunekit.quantize.api import quantize
    from tunekit.quantize.gguf_writer import write_gguf as wg

    with pytest.raises(TunekitError, match="importance matrix"):
        llamacpp.llama_quantize(tmp_path / "none.gguf", tmp_path / "x.gguf", "IQ2_XXS")
    # IQ2_XXS is refused by llama.cpp without an imatrix: success shows ours was accepted
    out = tmp_path / "iq2.gguf"
    card = quantize(tiny256, "gguf", out, qtype="IQ2_XXS", samples=8, progress=False)
    assert card["imatrix"]["entries"] == 2 * 7 + 1  # 7 linears per layer + untied output
    assert "IQ2_XXS" in {t for _, t, _ in iter_gguf_tensor_types(out)}
    # and it changes the result: the same type with and without an imatrix differ
    base = tmp_path / "base.gguf"
    wg(tiny256, base, "F32")
    texts = ["The capital of France is Paris. " * 20]
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    llamacpp.llama_quantize(base, a, "Q3_K_S")
    llamacpp.llama_quantize(base, b, "Q3_K_S", imatrix=llamacpp.compute_imatrix(tiny256, texts))
    assert a.read_bytes() != b.read_bytes()


def test_cli_gguf_verify_and_errors(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    runner = CliRunner()
    out = tmp_path / "m.gguf"
    args = ["quantize", str(tiny_model_dir), "--format", "gguf", "--type", "q8_0", "--output", str(out)]
    res = runner.invoke(app, [*args, "--verify"])
    assert res.exit_code == 0, res.output
    card = json.loads(out.with_name("m.gguf.card.json").read_text())
    v = card["verify"]
    assert v["tokens"] > 1000 and 0.9 < v["top1_agreement"] <= 1.0
    assert abs(v["ppl_change_pct"]) < 5 and 8.0 < v["output_bpw"] < 9.5

    res = runner.invoke(app, args)  # exists, no --overwrite
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, [*args[:-1], str(tmp_path / "n.gguf"), "--type", "Q9"])
    assert res.exit_code == 2 and "not a GGUF type" in res.output
    res = runner.invoke(
        app, ["quantize", str(tmp_path / "missing"), "--format", "gguf", "-o", str(tmp_path / "z")]
    )
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


def test_adapter_source_is_merged_first(tiny_model_dir, tmp_path):
    import gguf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.quantize.api import quantize

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = base.model.layers[0].self_attn.v_proj.weight.detach().clone().numpy()
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    card = quantize(tmp_path / "adapter", "gguf", out, qtype="F32", progress=False)
    assert card["source_kind"] == "adapter"
    merged = lora.merge_and_unload().model.layers[0].self_attn.v_proj.weight.detach().numpy()
    tensor = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.0.attn_v.weight")
    written = np.asarray(tensor.data).reshape(merged.shape)
    assert np.abs(written - merged).max() < 1e-5
    assert np.abs(written - original).max() > 1e-3  # the adapter really changed it


def test_embedding_type_keeps_embeddings_at_higher_precision(tiny_model_dir, tiny256, tmp_path):
    """--embedding-type: token_embd/output get the asked type, on the gguf-py and the llama.cpp paths, and the
    F16-embedding Q8_0 file is closer to HF than the all-Q8_0 one."""
    pytest.importorskip("llama_cpp")
    from tunekit.quantize import llamacpp
    from tunekit.quantize.api import quantize

    plain, keep = tmp_path / "q8.gguf", tmp_path / "q8-f16emb.gguf"
    write_gguf(tiny_model_dir, plain, "Q8_0")
    write_gguf(tiny_model_dir, keep, "Q8_0", embedding_type="F16")
    types = {n: t for n, t, _ in iter_gguf_tensor_types(keep)}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    tok, model = _hf(tiny_model_dir)
    ids = tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:128]
    lh = _hf_logits(model, ids)
    err = {p: np.abs(llamacpp.logits(llamacpp.load(p, n_ctx=128), ids) - lh).max() for p in (plain, keep)}
    assert err[keep] < err[plain], err
    out = tmp_path / "q4km-f16emb.gguf"
    quantize(tiny256, "gguf", out, qtype="Q4_K_M", embedding_type="Q8_0", progress=False)
    types = {n: t for n, t, _ in iter_gguf_tensor_types(out)}
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    with pytest.raises(TunekitError, match="--embedding-type"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", "Q8_0", embedding_type="Q4_K")
