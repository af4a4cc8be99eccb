"""PiSSA, MiLoRA, LoRA-XS, SVFT (issue #3): save → load in a fresh process, the plain-LoRA exports under
vanilla PEFT, merging into the base, adapter_sum, refusing another base, and 2-step `tunekit sft` runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_adapters_svd import adapter_config, batch, load, load_4bit, train_steps

from tunekit.adapters import AttachContext, attach, load_adapter, save_adapter
from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

METHODS = ["pissa", "milora", "lora_xs", "svft_banded", "svft_random", "svft_top_k"]


def cfg_of(name: str) -> AdapterConfig:
    return adapter_config(name, r=4, dropout=0.0)


def train_and_save(base_dir: Path, name: str, out: Path, seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    cfg = cfg_of(name)
    model = attach(load(base_dir), cfg, AttachContext())
    train_steps(model, steps=steps, seed=seed)
    with torch.no_grad():
        logits = model(batch(7)).logits
    save_adapter(model, cfg, out)
    return model, logits


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    runs = {}
    for name in METHODS:
        model, logits = train_and_save(tiny_model_dir, name, root / name)
        runs[name] = (root / name, logits, model)
    return runs


FRESH = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base, jobs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    x = torch.tensor(json.loads(sys.argv[4]))
    results = {}
    for key, (kind, folder) in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        if kind == "tunekit":
            from tunekit.adapters import load_adapter
            model = load_adapter(model, folder)
        else:  # vanilla PEFT, nothing from tunekit
            model = PeftModel.from_pretrained(model, folder)
        with torch.no_grad():
            results[key] = model(x).logits
    torch.save(results, out)
    """
)


def test_save_load_fresh_process_and_vanilla_peft_exports(trained, tiny_model_dir, tmp_path):
    jobs = {}
    for name, (folder, _, _) in trained.items():
        jobs[name] = ("tunekit", str(folder))
        if name in ("pissa", "milora"):  # saved as a plain LoRA relative to the original base
            jobs[name + ":peft"] = ("peft", str(folder))
        if name == "lora_xs":
            jobs[name + ":peft"] = ("peft", str(folder / "peft_lora"))
    out = tmp_path / "logits.pt"
    x = batch(7).tolist()
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(tiny_model_dir), json.dumps(jobs), str(out), json.dumps(x)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    for key in jobs:
        want = trained[key.split(":")[0]][1]
        diff = (got[key] - want).abs().max().item()
        assert diff < 1e-4, (key, diff)
        if key.startswith(("lora_xs", "svft")) and ":" not in key:
            assert diff < 1e-5, (key, diff)  # stored tensors / the same SVD recomputed
    # the trained adapters really moved away from the base
    base = load(tiny_model_dir)
    with torch.no_grad():
        assert (base(batch(7)).logits - trained["svft_banded"][1]).abs().max() > 1e-3


def test_pissa_export_is_rank_2r_plain_lora(trained):
    cfg = json.loads((trained["pissa"][0] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["init_lora_weights"] is True
    xs = json.loads((trained["lora_xs"][0] / "peft_lora" / "adapter_config.json").read_text())
    assert xs["r"] == 4 and xs["lora_alpha"] == 4


@pytest.mark.parametrize("name", ["pissa", "lora_xs", "svft_banded", "svft_random", "svft_top_k"])
def test_merge_into_base_gives_same_logits(name, trained, tiny_model_dir, tmp_path):
    from tunekit.merge.adapters import merge_adapter

    folder, logits, _ = trained[name]
    out = merge_adapter(tiny_model_dir, folder, tmp_path / "merged", progress=False, log=lambda m: None)
    with torch.no_grad():
        merged = load(out)(batch(7)).logits
    assert (merged - logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["svft_banded", "lora_xs"])
def test_adapter_sum_adds_trainable_tensors(name, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tunekit.merge.adapters import sum_adapters

    m1, _ = train_and_save(tiny_model_dir, name, tmp_path / "a", seed=1)
    m2, _ = train_and_save(tiny_model_dir, name, tmp_path / "b", seed=2)
    out = sum_adapters([tmp_path / "a", tmp_path / "b"], [0.7, 0.3], tmp_path / "sum", log=lambda m: None)
    weights = "svft_model.safetensors" if name.startswith("svft") else "lora_xs_model.safetensors"
    t1, ts = load_file(str(tmp_path / "a" / weights)), load_file(str(out / weights))
    assert {k: v.shape for k, v in t1.items()} == {k: v.shape for k, v in ts.items()}  # no parameter growth
    summed = load_adapter(load(tiny_model_dir), out)
    d1 = {n: m.delta_weight() for n, m in m1.named_modules() if hasattr(m, "delta_weight")}
    d2 = {n: m.delta_weight() for n, m in m2.named_modules() if hasattr(m, "delta_weight")}
    ds = {n: m.delta_weight() for n, m in summed.named_modules() if hasattr(m, "delta_weight")}
    assert set(ds) == set(d1) and len(ds) == 14
    for n in ds:
        torch.testing.assert_close(ds[n], 0.7 * d1[n] + 0.3 * d2[n], rtol=1e-4, atol=1e-6)
    assert ds[n].abs().max() > 0
    if name == "lora_xs":  # the plain-LoRA export is rebuilt for the sum (not copied from adapter a)
        from peft import PeftModel

        with torch.no_grad():
            want = summed(batch(7)).logits
            got = PeftModel.from_pretrained(load(tiny_model_dir), out / "peft_lora")(batch(7)).logits
        assert (got - want).abs().max().item() < 1e-4


def test_other_base_is_refused(trained, tiny_model_dir_b, tmp_path):
    for name in ("svft_banded", "lora_xs"):
        with pytest.raises(TunekitError, match="different base"):
            load_adapter(load(tiny_model_dir_b), trained[name][0])
    from tunekit.merge.adapters import merge_adapter, sum_adapters

    with pytest.raises(TunekitError, match="different base"):
        merge_adapter(tiny_model_dir_b, trained["svft_banded"][0], tmp_path / "m", progress=False, log=print)
    _, _ = train_and_save(tiny_model_dir_b, "svft_banded", tmp_path / "other")
    with pytest.raises(TunekitError, match="adapter_sum"):
        sum_adapters([trained["svft_banded"][0], tmp_path / "other"], [1, 1], tmp_path / "s", log=print)


def test_qlora_svft_save_load_and_merge_to_16bit_base(tiny_model_dir, tmp_path):
    """SVFT trained on a 4-bit base: reloads on the 4-bit base exactly; on the 16-bit base the fingerprint is
    checked through the 4-bit round trip, and the merge into the 16-bit weights uses the same U, V."""
    pytest.importorskip("bitsandbytes")
    from tunekit.merge.adapters import merge_adapter

    cfg = cfg_of("svft_banded")
    model = attach(load_4bit(tiny_model_dir), cfg, AttachContext(quantized=True))
    train_steps(model, steps=3)
    with torch.no_grad():
        want = model(batch(7)).logits
    save_adapter(model, cfg, tmp_path / "ad")
    again = load_adapter(load_4bit(tiny_model_dir), tmp_path / "ad")
    with torch.no_grad():
        assert (again(batch(7)).logits - want).abs().max().item() < 1e-5
    on16 = load_adapter(load(tiny_model_dir), tmp_path / "ad")  # fingerprint via the 4-bit round trip
    merged = load(merge_adapter(tiny_model_dir, tmp_path / "ad", tmp_path / "m", progress=False, log=print))
    with torch.no_grad():
        assert (on16(batch(7)).logits - merged(batch(7)).logits).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "method,files",
    [
        ("pissa", ["adapter_config.json"]),
        ("milora", ["adapter_config.json"]),
        ("lora_xs", ["lora_xs_config.json", "peft_lora/adapter_model.safetensors"]),
        ("svft", ["svft_config.json", "svft_model.safetensors"]),
    ],
)
def test_cli_sft_two_steps(method, files, tiny_model_dir, tiny_jsonl, tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    sets = {
        "model.name": tiny_model_dir,
        "data.train": tiny_jsonl,
        "data.max_length": 64,
        "adapter.method": method,
        "adapter.r": 4,
        "adapter.svft.pattern": "banded",
        "train.max_steps": 2,
        "train.batch_size": 4,
        "train.save_steps": 0,
        "generate.samples": 0,
    }
    args = ["sft", "-o", str(tmp_path / "run")] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    for f in files:
        assert (adapter / f).is_file(), f
    model = load_adapter(load(tiny_model_dir), adapter)  # loads on the untouched base
    with torch.no_grad():
        assert torch.isfinite(model(batch()).logits).all()
