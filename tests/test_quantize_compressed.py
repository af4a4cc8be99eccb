"""GPTQ / AWQ through llmcompressor on the tiny model: the result reloads in transformers and its layer
outputs on held-out text are closer to the source than plain round-to-nearest at the same bits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llmcompressor")

import torch  # noqa: E402

from tunekit.errors import TunekitError  # noqa: E402
from tunekit.quantize.compressed import pick_group_size, quantize_w4a16  # noqa: E402
from tunekit.quantize.verify import default_eval_texts  # noqa: E402


def _rtn_(model, group: int, symmetric: bool) -> None:
    """Plain round-to-nearest 4-bit, per group of `group` input columns, in place (lm_head kept)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = mod.weight.data
        g = w.reshape(w.shape[0], -1, group)
        if symmetric:
            scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7.5
            q = (g / scale).round().clamp(-8, 7) * scale
        else:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            zero = (-lo / scale).round()
            q = ((g / scale).round() + zero).clamp(0, 15).sub(zero) * scale
        mod.weight.data = q.reshape(w.shape)


def _layer_outputs(model, batches) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return outs


def _error(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return float(sum(((a - b) ** 2).sum() for a, b in zip(ref, other, strict=True)))


@pytest.fixture(scope="module")
def held_out(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = default_eval_texts("eval")[:8]
    return [tok(t, return_tensors="pt", truncation=True, max_length=128)["input_ids"] for t in texts]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_w4a16_reloads_and_beats_rtn(method, tiny_model_dir, held_out, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    info = quantize_w4a16(
        tiny_model_dir, out, method, default_eval_texts("calibration")[:32], samples=32, max_length=128
    )
    assert info["group_size"] == 64  # 128 does not divide hidden 64: chosen down
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quant = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rtn = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _rtn_(rtn, 64, symmetric=method == "gptq")

    ref = _layer_outputs(source, held_out)
    err_q = _error(ref, _layer_outputs(quant, held_out))
    err_rtn = _error(ref, _layer_outputs(rtn, held_out))
    assert 0 < err_q < err_rtn, (method, err_q, err_rtn)


def test_group_size_is_chosen_down():
    assert pick_group_size([64, 128], 128) == 64
    assert pick_group_size([576, 1536], 128) == 64
    assert pick_group_size([4096, 11008], 128) == 128
    with pytest.raises(TunekitError):
        pick_group_size([60], 128)
