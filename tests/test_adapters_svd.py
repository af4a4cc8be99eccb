"""PiSSA, MiLoRA, LoRA-XS, SVFT (issue #3): init equals base, parameter counts follow the papers' formulas
(tiny model and a config-only Mistral-7B on the meta device, also through `tunekit sft --dry-run`), one step
changes only trainable tensors, and the QLoRA (4-bit base) variants."""

from __future__ import annotations

import json

import pytest
import torch

from tunekit.adapters import AttachContext, attach, count_trainable
from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

# tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads (head_dim 16)
TINY_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (d_out, d_in)
TINY_LAYERS = 2
# Mistral-7B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads (head_dim 128)
MISTRAL_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                  (4096, 14336)]
MISTRAL_LAYERS = 32
MISTRAL_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

CASES = {  # name -> AdapterConfig kwargs
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "pissa": dict(method="pissa"),
    "pissa_fast": dict(method="pissa", svd_niter=4),
    "milora": dict(method="milora"),
    "lora_xs": dict(method="lora_xs"),
    "svft_plain": dict(method="svft"),
    "svft_banded": dict(method="svft", svft={"pattern": "banded", "d": 2}),
    "svft_random": dict(method="svft", svft={"pattern": "random", "k": 3}),
    "svft_top_k": dict(method="svft", svft={"pattern": "top_k", "k": 8}),
    "svft_rank": dict(method="svft", svft={"pattern": "banded", "d": 1, "rank": 16}),
}


def adapter_config(name: str, **kw) -> AdapterConfig:
    """AdapterConfig of a CASES entry; `lora_xs_init_std` only for LoRA-XS (other methods refuse it)."""
    case = CASES[name]
    if case["method"] != "lora_xs":
        kw.pop("lora_xs_init_std", None)
    return AdapterConfig(**kw, **case)


def expected_count(case: dict, shapes: list[tuple[int, int]], layers: int, r: int) -> int:
    """The papers' formulas, written independently of the implementation."""
    method = case["method"]
    sv = case.get("svft", {})
    total = 0
    for d_out, d_in in shapes:
        if method in ("lora", "pissa", "milora"):
            total += r * (d_in + d_out)
        elif method == "dora":
            total += r * (d_in + d_out) + d_out  # + magnitude vector
        elif method == "lora_xs":
            total += r * r
        else:
            n = min(d_out, d_in, sv.get("rank") or 10**9)
            pattern = sv.get("pattern", "plain")
            if pattern == "plain":
                total += n
            elif pattern == "banded":
                d = sv["d"]
                total += (2 * d + 1) * n - d * (d + 1)
            elif pattern == "random":
                total += n * sv["k"]
            else:
                total += min(sv["k"], n) ** 2
    return total * layers


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (2, 12), generator=g)


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir):
    with torch.no_grad():
        return load(tiny_model_dir)(batch()).logits


@pytest.mark.parametrize("name", list(CASES))
def test_init_equals_base_and_counts(name, tiny_model_dir, base_logits):
    case = CASES[name]
    model = attach(load(tiny_model_dir), adapter_config(name, r=4, dropout=0.0), AttachContext()).eval()
    with torch.no_grad():
        diff = (model(batch()).logits - base_logits).abs().max().item()
    if case["method"] in ("lora", "dora"):
        assert diff == 0.0
    elif case["method"] == "lora_xs":  # R ~ N(0, 1e-5²): a tiny but real perturbation
        assert 0.0 < diff < 5e-3
    else:
        assert diff < 1e-4
    assert count_trainable(model)[0] == expected_count(case, TINY_SHAPES, TINY_LAYERS, 4)


def test_lora_xs_zero_init_is_exact(tiny_model_dir, base_logits):
    cfg = AdapterConfig(method="lora_xs", r=4, lora_xs_init_std=0.0, dropout=0.0)
    model = attach(load(tiny_model_dir), cfg, AttachContext()).eval()
    with torch.no_grad():
        assert torch.equal(model(batch()).logits, base_logits)


def test_pissa_and_milora_pick_principal_and_minor_components(tiny_model_dir):
    """A, B hold the r largest (PiSSA) / smallest (MiLoRA) singular values: s·B·A has exactly those."""
    w = load(tiny_model_dir).model.layers[0].mlp.gate_proj.weight.detach()
    sv = torch.linalg.svdvals(w)
    for method, want in (("pissa", sv[:4]), ("milora", sv[-4:])):
        model = attach(load(tiny_model_dir), AdapterConfig(method=method, r=4), AttachContext())
        layer = model.base_model.model.model.layers[0].mlp.gate_proj
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        got = torch.linalg.svdvals(delta.detach())[:4]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        residual = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(residual + delta.detach(), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "dora", "pissa_fast", "svft_rank"])  # the rest: through the CLI below
def test_meta_7b_counts_follow_formulas(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**MISTRAL_CONFIG)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = attach(model, adapter_config(name, r=16), AttachContext(meta=True))
    assert count_trainable(model)[0] == expected_count(CASES[name], MISTRAL_SHAPES, MISTRAL_LAYERS, 16)


@pytest.mark.parametrize("name", ["pissa", "milora", "lora_xs", "svft_plain", "svft_banded", "svft_random",
                                  "svft_top_k"])
def test_cli_dry_run_prints_formula_count(name, tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_CONFIG))
    case = CASES[name]
    sets = [f"model.name={folder}", f"adapter.method={case['method']}", "adapter.r=16"]
    sets += [f"adapter.svft.{k}={v}" for k, v in case.get("svft", {}).items()]
    args = ["sft", "--dry-run"] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    want = expected_count(case, MISTRAL_SHAPES, MISTRAL_LAYERS, 16)
    assert f"trainable parameters: {want}" in result.output
    if name == "svft_plain":
        assert want == 720_896  # 32 layers × (4096 + 1024 + 1024 + 4096 + 3 × 4096)
    if name == "lora_xs":
        assert want == 32 * 7 * 256


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (packed 4-bit weights stored as float32 may hold NaN patterns, which never compare equal)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _snapshot(model) -> dict[str, torch.Tensor]:
    state = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        state[n] = t.detach().clone()
    return state


def train_steps(model, steps: int = 1, lr: float = 1e-2, seed: int = 0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for i in range(steps):
        x = batch(seed + i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", ["pissa", "milora", "lora_xs", "svft_plain", "svft_banded", "svft_random",
                                  "svft_top_k"])
def test_one_step_changes_only_trainable_tensors(name, tiny_model_dir):
    model = attach(load(tiny_model_dir), adapter_config(name, r=4, dropout=0.0), AttachContext())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    train_steps(model)
    after = _snapshot(model)
    changed = {n for n in before if not same_bits(before[n], after[n])}
    assert changed == trainable, (sorted(changed ^ trainable))[:5]


def test_svd_niter_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="svd_niter"):
        AdapterConfig(method="milora", svd_niter=2)


def test_bad_inputs_are_tunekit_errors(tiny_model_dir):
    with pytest.raises(TunekitError, match="exceeds"):
        attach(load(tiny_model_dir), AdapterConfig(method="lora_xs", r=40), AttachContext())
    with pytest.raises(TunekitError, match="'nope' matches no module"):
        attach(load(tiny_model_dir), AdapterConfig(method="svft", targets=["nope"]), AttachContext())
    with pytest.raises(TunekitError, match="no linear layer"):
        attach(load(tiny_model_dir), AdapterConfig(method="svft", targets=["input_layernorm"]), AttachContext())
    with pytest.raises(TunekitError, match="new token"):
        attach(load(tiny_model_dir), AdapterConfig(method="svft"), AttachContext(new_token_ids=[5]))


# ------------------------------------------------------------------------------------------------ QLoRA


def load_4bit(path):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    return load(path, quantization_config=q, device_map={"": "cpu"})


def test_qpissa_residual_is_4bit_and_svd_of_dequantised(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from tunekit.adapters._svd import dense_weight, is_4bit

    ref = load_4bit(tiny_model_dir)
    w_deq = dense_weight(ref.model.layers[1].self_attn.o_proj)
    for method, part in (("pissa", slice(0, 4)), ("milora", slice(60, 64))):
        model = attach(load_4bit(tiny_model_dir), AdapterConfig(method=method, r=4), AttachContext(quantized=True))
        layer = model.base_model.model.model.layers[1].self_attn.o_proj
        base = layer.get_base_layer()
        assert is_4bit(base)  # the frozen residual is stored 4-bit
        delta = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        # A, B are the components of the de-quantised weight ...
        torch.testing.assert_close(
            torch.linalg.svdvals(delta)[:4], torch.linalg.svdvals(w_deq)[part], rtol=1e-4, atol=1e-5
        )
        # ... and Q(W_res) + s·B·A reconstructs it up to the 4-bit error of the residual
        err = (dense_weight(base) + delta - w_deq).norm() / w_deq.norm()
        assert err < 0.15
        train_steps(model)  # trains on the 4-bit base


@pytest.mark.parametrize("name", ["lora_xs", "svft_banded"])
def test_qlora_custom_adapters_init_and_step(name, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    x = batch()
    with torch.no_grad():
        ref = load_4bit(tiny_model_dir)(x).logits
    cfg = adapter_config(name, r=4, dropout=0.0, lora_xs_init_std=0.0)
    model = attach(load_4bit(tiny_model_dir), cfg, AttachContext(quantized=True))
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max().item() < 1e-4
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "base_layer.weight" in n}
    assert count_trainable(model)[0] == expected_count(CASES[name], TINY_SHAPES, TINY_LAYERS, 4)
    train_steps(model)
    for n, t in model.state_dict().items():
        if n in frozen:
            assert same_bits(t, frozen[n]), n
