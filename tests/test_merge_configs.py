"""Published-config features on real tiny models: slices/passthrough frankenmerges, model+lora, hub ids,
tokenizer union / tokens blocks, chat_template, and DELLA reproducibility from --seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tunekit.errors import TunekitError
from tunekit.merge.config import validate_config
from tunekit.merge.engine import merge_models
from tunekit.merge.io import SafetensorsFolder


def _tensors(folder) -> dict[str, torch.Tensor]:
    f = SafetensorsFolder(folder)
    return {n: f.read(n) for n in f.names()}


def _merge(out, raw, **kw):
    merge_models(validate_config(raw), out, progress=False, log=lambda m: None, **kw)
    return _tensors(out)


def test_passthrough_frankenmerge_stacks_layers(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    raw = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(tiny_model_dir), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tiny_model_dir_b), "layer_range": [1, 2]}]},
            {"sources": [{"model": str(tiny_model_dir), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        ],
    }
    out = _merge(tmp_path / "fm", raw)
    cfg = json.loads((tmp_path / "fm" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    per_layer = len([n for n in a if ".layers.0." in n])
    assert len(out) == len(a) + 2 * per_layer
    for n in (k for k in a if ".layers.1." in k):
        assert torch.equal(out[n], a[n])
        assert torch.equal(out[n.replace(".layers.1.", ".layers.2.")], b[n])  # B's layer 1 became layer 2
        assert torch.equal(out[n.replace(".layers.1.", ".layers.3.")], 0.5 * a[n])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    # post-layer tensors come from the last slice, with its parameters (scale 0.5), as mergekit plans them
    assert torch.equal(out["lm_head.weight"], 0.5 * a["lm_head.weight"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fm")
    assert len(model.model.layers) == 4
    ids = AutoTokenizer.from_pretrained(tmp_path / "fm")("hello world", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_slices_with_different_ranges_and_gradient(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    raw = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": str(tiny_model_dir), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                    {"model": str(tiny_model_dir_b), "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
            {
                "sources": [
                    {"model": str(tiny_model_dir), "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                    {"model": str(tiny_model_dir_b), "layer_range": [0, 1], "parameters": {"weight": 3.0}},
                ]
            },
        ],
    }
    out = _merge(tmp_path / "lin", raw)
    n0, n1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(out[n0], a[n0])  # t=0 of the gradient: weight 1 on A, 0 on B
    assert torch.allclose(out[n1], b[n1])  # t=1
    # a one-layer slice mixing A's layer 1 with B's layer 0, output layer 2
    assert torch.allclose(out["model.layers.2.mlp.up_proj.weight"], (a[n1] + 3 * b[n0]) / 4, atol=1e-6)
    assert json.loads((tmp_path / "lin" / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([{"sources": [{"model": "{a}", "layer_range": [0, 5]}]}], "past the end of model"),
        ([{"sources": [{"model": "{a}", "layer_range": [1, 1]}]}], "is empty"),
        ([{"sources": [{"model": "{a}", "layer_range": [0, 2]}, {"model": "{b}", "layer_range": [0, 1]}]}],
         "same number of layers"),
        ([{"sources": [{"model": "{a}", "layer_range": [0, 1]}, {"model": "{b}", "layer_range": [0, 1]}]}],
         "takes exactly 1 input models"),
        ([{"sources": [{"model": "{a}"}]}], "'layer_range' must be [start, end]"),
    ],
)
def test_bad_slices_exit_2(tmp_path, tiny_model_dir, tiny_model_dir_b, slices, message):
    text = json.dumps(slices).replace("{a}", str(tiny_model_dir)).replace("{b}", str(tiny_model_dir_b))
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": json.loads(text)}))
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    res = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and message in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_model_plus_lora_folds_adapter_while_streaming(tmp_path, tiny_model_dir, tiny_model_dir_b):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.merge.adapters import merge_adapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    folded = _tensors(merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "folded", progress=False,
                                    log=lambda m: None))
    ref = f"{tiny_model_dir}+{tmp_path / 'adapter'}"
    b = _tensors(tiny_model_dir_b)
    raw = {
        "merge_method": "slerp",
        "base_model": ref,
        "dtype": "float32",
        "models": [{"model": ref}, {"model": str(tiny_model_dir_b)}],
        "parameters": {"t": 0.0},
    }
    out = _merge(tmp_path / "t0", raw)
    assert all(torch.equal(out[n], folded[n]) for n in folded)
    raw["parameters"] = {"t": 0.4}
    from tunekit.merge import methods

    out = _merge(tmp_path / "mid", raw)
    n = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(folded[n], _tensors(tiny_model_dir)[n])  # the adapter touched it
    assert torch.allclose(out[n], methods.slerp(folded[n], b[n], 0.4), atol=1e-6)
    with pytest.raises(TunekitError, match="not a local folder or tunekit run"):
        _merge(tmp_path / "x", {**raw, "base_model": f"{tiny_model_dir}+/nope",
                                "models": [{"model": f"{tiny_model_dir}+/nope"}, {"model": str(tiny_model_dir_b)}]})


def _fake_hub_cache(root, repo, src):
    """The hub cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0" * 40
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(src, folder / "snapshots" / commit)


@pytest.mark.slow
def test_hub_ids_from_cache_and_clean_offline_error(tmp_path, tiny_model_dir, tiny_model_dir_b):
    _fake_hub_cache(tmp_path / "hub", "org/tiny-b", tiny_model_dir_b)
    cfg = tmp_path / "hub.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": str(tiny_model_dir),
                "models": [{"model": str(tiny_model_dir)}, {"model": "org/tiny-b"}],
                "parameters": {"t": 1.0},
            }
        )
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunekit", "merge", str(cfg), str(tmp_path / "out"), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    b = _tensors(tiny_model_dir_b)
    out = _tensors(tmp_path / "out")
    assert all(torch.equal(out[n], b[n]) for n in b)
    cfg.write_text(cfg.read_text().replace("org/tiny-b", "org/not-cached"))
    res = subprocess.run([*cmd[:-2], str(tmp_path / "out2"), "--no-progress"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hub cache (" in res.stderr and "not cached" in res.stderr and "HF_HUB_OFFLINE is set" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "out2").exists()


def _model_with_extra_tokens(tmp_path, src, tokens):
    """A copy of `src` whose tokenizer has extra tokens, with new embedding/lm_head rows 10·(k+1)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    dst = tmp_path / "extra"
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    t = load_file(dst / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.stack([torch.full((t[name].shape[1],), 10.0 * (k + 1)) for k in range(len(tokens))])
        t[name] = torch.cat([t[name], rows])
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = len(tok)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_union_and_tokens_block(tmp_path, tiny_model_dir, tiny_model_dir_b):
    from transformers import AutoTokenizer

    c = _model_with_extra_tokens(tmp_path, tiny_model_dir_b, ["<tool>", "<think>"])
    a, ct = _tensors(tiny_model_dir), _tensors(c)
    n_a = a["model.embed_tokens.weight"].shape[0]
    raw = {
        "merge_method": "linear",
        "base_model": str(tiny_model_dir),
        "dtype": "float32",
        "tokenizer_source": "union",
        "models": [
            {"model": str(tiny_model_dir), "parameters": {"weight": 1.0}},
            {"model": str(c), "parameters": {"weight": 3.0}},
        ],
    }
    out = _merge(tmp_path / "u", raw)
    tok = AutoTokenizer.from_pretrained(tmp_path / "u")
    assert len(tok) == n_a + 2 and json.loads((tmp_path / "u" / "config.json").read_text())["vocab_size"] == n_a + 2
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e = out[name]
        assert e.shape[0] == n_a + 2
        assert torch.allclose(e[:n_a], (a[name] + 3 * ct[name][:n_a]) / 4, atol=1e-6)  # shared tokens: linear
        tid = tok.convert_tokens_to_ids("<think>")
        assert torch.allclose(e[tid], torch.full_like(e[tid], 20.0))  # only C has it: C's row in every copy
    # a tokens block: <tool> forced to zeros, <think> from a token of A, padded to a multiple of 8
    raw.pop("tokenizer_source")
    think = tok.convert_tokens_to_ids("hello") if "hello" in tok.get_vocab() else 5
    raw["tokenizer"] = {
        "source": "union",
        "pad_to_multiple_of": 8,
        "tokens": {
            "<tool>": {"source": {"kind": "zero"}, "force": True},
            "<think>": {"source": {"kind": "model_token", "model": str(tiny_model_dir), "token_id": think}},
        },
    }
    out = _merge(tmp_path / "blk", raw)
    e = out["model.embed_tokens.weight"]
    size = -(-(n_a + 2) // 8) * 8
    assert e.shape[0] == size
    assert torch.equal(e[tok.convert_tokens_to_ids("<tool>")], torch.zeros(e.shape[1]))
    # <think>: in A's copy A's row `think`; in C's copy C's own row (present, not forced) -> linear mix
    tid = tok.convert_tokens_to_ids("<think>")
    assert torch.allclose(e[tid], (a["model.embed_tokens.weight"][think] + 3 * 20.0) / 4, atol=1e-5)
    assert torch.allclose(e[n_a + 2 :], e[: n_a + 2].mean(0).expand(size - n_a - 2, -1), atol=1e-5)


def test_chat_template_named_and_auto(tmp_path, tiny_model_dir, tiny_model_dir_b):
    from transformers import AutoTokenizer

    from tunekit.merge.tokenizer import CHATML

    raw = {
        "merge_method": "slerp",
        "base_model": str(tiny_model_dir),
        "models": [{"model": str(tiny_model_dir)}, {"model": str(tiny_model_dir_b)}],
        "parameters": {"t": 0.5},
        "chat_template": "chatml",
    }
    _merge(tmp_path / "named", raw)
    tok = AutoTokenizer.from_pretrained(tmp_path / "named")
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    _merge(tmp_path / "auto", {**raw, "chat_template": "auto"})
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template.strip() == (
        AutoTokenizer.from_pretrained(tiny_model_dir).chat_template.strip()
    )
    with pytest.raises(TunekitError, match="chat_template 'vicuna'"):
        validate_config({**raw, "chat_template": "vicuna"})


def test_della_is_seeded_and_keeps_the_density(tmp_path, tiny_model_dir, tiny_model_dir_b):
    raw = {
        "merge_method": "della_linear",
        "base_model": str(tiny_model_dir),
        "dtype": "float32",
        "parameters": {"rescale": False},
        "models": [{"model": str(tiny_model_dir_b), "parameters": {"weight": 1.0, "density": 0.3, "epsilon": 0.1}}],
    }
    r1, r2 = _merge(tmp_path / "1", raw, seed=5), _merge(tmp_path / "2", raw, seed=5)
    r3 = _merge(tmp_path / "3", raw, seed=6)
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    n = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(r1[k], r2[k]) for k in r1) and not torch.equal(r1[n], r3[n])
    changed = r1[n] != a[n]
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.allclose(r1[n][changed], b[n][changed])  # kept entries are the fine-tune's, no rescale
    with pytest.raises(TunekitError, match="density ± epsilon"):
        merge_models(validate_config({**raw, "models": [{"model": str(tiny_model_dir_b), "parameters": {
            "weight": 1.0, "density": 0.1, "epsilon": 0.15}}]}), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_short_forms_of_new_methods(tmp_path, tiny_model_dir, tiny_model_dir_b):
    from tunekit.merge.engine import short_config

    cfg = short_config("della", [str(tiny_model_dir_b)], base=str(tiny_model_dir), density=0.5)
    assert cfg.models[0].parameters == {"weight": 1.0, "density": 0.5}
    cfg = short_config("model_stock", [str(tiny_model_dir_b), str(tiny_model_dir_b) + "/."], base=str(tiny_model_dir))
    assert cfg.base_model == str(tiny_model_dir) and all(m.parameters is None for m in cfg.models)
    cfg = short_config("nuslerp", [str(tiny_model_dir), str(tiny_model_dir_b)], weights=[1.0, 3.0])
    assert cfg.base_model is None and [m.parameters["weight"] for m in cfg.models] == [1.0, 3.0]
    with pytest.raises(TunekitError, match="--weights is not used by 'karcher'"):
        short_config("karcher", [str(tiny_model_dir), str(tiny_model_dir_b)], weights=[1.0, 1.0])
    with pytest.raises(TunekitError, match="--density is not used by 'sce'"):
        short_config("sce", [str(tiny_model_dir_b)], base=str(tiny_model_dir), density=0.5)
