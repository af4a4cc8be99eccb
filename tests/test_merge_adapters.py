"""Folding real PEFT adapters into a tiny base gives the adapter logits; adapter_sum registry rules."""

from __future__ import annotations

import shutil

import pytest
import torch

from tunekit.adapters import AdapterKind, register, unregister
from tunekit.adapters.lora import build_lora
from tunekit.adapters.lora import plan_merge as lora_plan
from tunekit.errors import TunekitError
from tunekit.merge.adapters import merge_adapter, sum_adapters
from tunekit.merge.io import SafetensorsFolder

IDS = torch.tensor([[5, 17, 42, 99, 311, 7, 64, 200]])


def _make_adapter(base_dir, folder, seed=0, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "up_proj"],
        "init_lora_weights": False,
    }
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    peft_model.save_pretrained(folder)
    return folder


def _peft_logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        adapter_logits = peft_model(IDS).logits
        merged = peft_model.merge_and_unload()
        merged_logits = merged(IDS).logits
    return adapter_logits, merged_logits


def _logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"up_proj": 3}},
        {"use_dora": True},
        {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora", "rslora-patterns", "dora", "embedding-modules_to_save"],
)
def test_merge_adapter_matches_peft_logits(tmp_path, tiny_model_dir, kwargs):
    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter", **kwargs)
    out = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", progress=False, log=lambda m: None)
    ours = _logits(out)
    adapter_logits, peft_merged = _peft_logits(tiny_model_dir, adapter)
    base_logits = _logits(tiny_model_dir)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert torch.allclose(ours, adapter_logits, atol=1e-4), (ours - adapter_logits).abs().max()
    assert torch.allclose(ours, peft_merged, atol=1e-4)


def test_merge_adapter_from_run_dir_4bit_note_and_dtype(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    _make_adapter(tiny_model_dir, run / "adapter")
    (run / "recipe.yaml").write_text(f"model:\n  name: {tiny_model_dir}\n  load_in_4bit: true\n")
    notes: list[str] = []
    out = merge_adapter(None, run, tmp_path / "merged", dtype="bf16", progress=False, log=notes.append)
    assert any("16-bit base" in n for n in notes)
    merged = SafetensorsFolder(out)
    assert merged.info("model.layers.0.self_attn.q_proj.weight").dtype == "bfloat16"
    adapter_logits, _ = _peft_logits(tiny_model_dir, run / "adapter")
    ours = _logits(out)
    assert (ours - adapter_logits).abs().max() < 0.1  # bf16 rounding only
    from transformers import AutoModelForCausalLM

    gen = AutoModelForCausalLM.from_pretrained(out).generate(IDS[:, :3], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


def test_merge_adapter_errors(tmp_path, tiny_model_dir):
    run = tmp_path / "full"
    (run / "model").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model:\n  name: x\n")
    with pytest.raises(TunekitError, match="full fine-tune"):
        merge_adapter(tiny_model_dir, run, tmp_path / "o")
    with pytest.raises(TunekitError, match="not found"):
        merge_adapter(tiny_model_dir, tmp_path / "nope", tmp_path / "o")
    adapter = _make_adapter(tiny_model_dir, tmp_path / "a", bias="all")
    with pytest.raises(TunekitError, match="bias"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_adapter_sum_refuses_plain_lora(tmp_path, tiny_model_dir):
    a = _make_adapter(tiny_model_dir, tmp_path / "a", seed=0)
    b = _make_adapter(tiny_model_dir, tmp_path / "b", seed=1)
    with pytest.raises(TunekitError, match=r"plain LoRA.*\(B1\+B2\)\(A1\+A2\) != B1·A1 \+ B2·A2"):
        sum_adapters([a, b], [0.5, 0.5], tmp_path / "sum")
    assert not (tmp_path / "sum").exists()


@pytest.fixture
def b_only_lora_type():
    """A LoRA variant with a frozen, shared A (as LoRA-FA): summing B is exact, Σw_i·B_i·A = Σw_i·ΔW_i."""
    kind = AdapterKind(
        name="lora_shared_a",
        build=build_lora,
        methods=("lora_shared_a",),
        detect=lambda folder: (folder / "SHARED_A").is_file(),
        plan_merge=lora_plan,
        summable=lambda name: ".lora_B." in name,
    )
    register(kind)  # registered after the built-in LoRA kind, so detected before it
    yield kind
    unregister(kind.name)


def _shared_a_pair(tmp_path, base_dir):
    from safetensors.torch import load_file, save_file

    a = _make_adapter(base_dir, tmp_path / "a", seed=0)
    b = _make_adapter(base_dir, tmp_path / "b", seed=1)
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    for k in tb:
        if ".lora_A." in k:
            tb[k] = ta[k].clone()
    save_file(tb, str(b / "adapter_model.safetensors"))
    for f in (a, b):
        (f / "SHARED_A").write_text("")
    return a, b


def test_adapter_sum_registered_type_is_exact(tmp_path, tiny_model_dir, b_only_lora_type):
    a, b = _shared_a_pair(tmp_path, tiny_model_dir)
    summed = sum_adapters([a, b], [0.7, 0.3], tmp_path / "sum", log=lambda m: None)
    merged = {}
    for name, folder in (("a", a), ("b", b), ("sum", summed)):
        out = merge_adapter(
            tiny_model_dir, folder, tmp_path / f"m_{name}", progress=False, log=lambda m: None
        )
        merged[name] = SafetensorsFolder(out)
    base = SafetensorsFolder(tiny_model_dir)
    n = "model.layers.1.self_attn.q_proj.weight"
    w0, wa, wb, ws = (f.read(n) for f in (base, merged["a"], merged["b"], merged["sum"]))
    assert torch.allclose(ws, w0 + 0.7 * (wa - w0) + 0.3 * (wb - w0), atol=1e-5)
    assert not torch.allclose(ws, wa, atol=1e-3)


def test_adapter_sum_refuses_mismatches(tmp_path, tiny_model_dir, b_only_lora_type):
    from safetensors.torch import load_file, save_file

    a, b = _shared_a_pair(tmp_path, tiny_model_dir)
    c = tmp_path / "c"
    shutil.copytree(b, c)
    t = load_file(c / "adapter_model.safetensors")
    k = next(k for k in t if ".lora_A." in k)
    t[k] = t[k] + 1
    save_file(t, str(c / "adapter_model.safetensors"))
    with pytest.raises(TunekitError, match="frozen tensor .*lora_A"):
        sum_adapters([a, c], [0.5, 0.5], tmp_path / "s1")
    d = tmp_path / "d"
    shutil.copytree(b, d)
    cfg = (d / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 16')
    (d / "adapter_config.json").write_text(cfg)
    with pytest.raises(TunekitError, match="config key 'lora_alpha'"):
        sum_adapters([a, d], [0.5, 0.5], tmp_path / "s2")
