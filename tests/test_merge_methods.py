"""Merge methods against their formulas (hand cases), and the streaming engine on real tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunekit.errors import TunekitError
from tunekit.merge import methods
from tunekit.merge.config import evaluate_setting, validate_config
from tunekit.merge.engine import merge_models
from tunekit.merge.io import SafetensorsFolder
from tunekit.merge.methods import (
    generalized_task_arithmetic,
    linear,
    sign_consensus_mask,
    slerp,
    sparsify_magnitude,
    sparsify_random,
)


def _tensors(folder) -> dict[str, torch.Tensor]:
    f = SafetensorsFolder(folder)
    return {n: f.read(n) for n in f.names()}


def _merge(tmp_path, name, raw, **kw):
    out = tmp_path / name
    merge_models(validate_config(raw), out, progress=False, log=lambda m: None, **kw)
    return _tensors(out)


# ----------------------------------------------------------------------------------------- pure functions


def test_slerp_hand_case_quarter_circle():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    # Ω = π/2: s0 = s1 = sin(π/4)/sin(π/2)
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-6)
    # t = 1/3: s0 = sin(π/3), s1 = sin(π/6)
    assert torch.allclose(slerp(a, b, 1 / 3), 2 * torch.tensor([math.sin(math.pi / 3), 0.5]), atol=1e-6)


def test_slerp_endpoints_exact_and_fallbacks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    # near-colinear -> lerp
    assert torch.allclose(slerp(a, 3 * a, 0.25), 0.75 * a + 0.25 * 3 * a)
    # zero tensor -> lerp (no division by a zero norm)
    z = torch.zeros_like(a)
    assert torch.allclose(slerp(z, b, 0.3), 0.3 * b)
    # slerp keeps the norm of equal-norm endpoints (lerp would shrink it)
    b2 = b / b.norm() * a.norm()
    assert slerp(a, b2, 0.5).norm() == pytest.approx(float(a.norm()), rel=1e-5)


def test_linear_formula():
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])
    assert torch.allclose(linear([x, y], [1, 3], normalize=True), (x + 3 * y) / 4)
    assert torch.allclose(linear([x, y], [1, 3], normalize=False), x + 3 * y)


def test_task_arithmetic_formula():
    base = torch.tensor([1.0, 1.0, 1.0])
    d1, d2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 4.0, 0.5])
    out = generalized_task_arithmetic(base, [d1, d2], [0.5, 0.25], lambda_=2.0)
    assert torch.allclose(out, base + 2.0 * (0.5 * d1 + 0.25 * d2))
    out = generalized_task_arithmetic(base, [d1, d2], [0.5, 0.25], normalize=True)
    assert torch.allclose(out, base + (0.5 * d1 + 0.25 * d2) / 0.75)


def test_ties_trim_elect_disjoint_mean_hand_case():
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.1])
    d2 = torch.tensor([-3.0, 1.0, 1.0, 0.2])
    # trim: density 0.5 keeps the 2 largest |δ|
    assert torch.equal(sparsify_magnitude(d1, 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0]))
    # elect: Σδ = [-2, -1, 4, 0.3] -> signs [-, -, +, +]
    mask = sign_consensus_mask(torch.stack([d1, d2]), "sum")
    assert mask.tolist() == [[False, True, True, True], [True, False, True, True]]
    # 'count' breaks the 1-1 ties towards +
    assert sign_consensus_mask(torch.stack([d1, d2]), "count")[:, 0].tolist() == [True, False]
    # disjoint mean over agreeing entries
    out = generalized_task_arithmetic(torch.zeros(4), [d1, d2], [1.0, 1.0], consensus="sum", normalize=True)
    assert torch.allclose(out, torch.tensor([-3.0, -2.0, 2.0, 0.15]))
    # PEFT's ties (weights 1, density 1) computes the same disjoint mean
    from peft.utils.merge_utils import ties

    assert torch.allclose(ties([d1, d2], torch.tensor([1.0, 1.0]), density=1.0), out)


def test_ties_weighted_matches_stacked_formula():
    g = torch.Generator().manual_seed(5)
    base, ds, w = torch.randn(50, generator=g), [torch.randn(50, generator=g) for _ in range(3)], [0.5, 2.0, -1.0]
    weighted = torch.stack([d * wi for d, wi in zip(ds, w)])
    mask = sign_consensus_mask(weighted, "sum").float()
    wt = torch.tensor(w).view(-1, 1)
    divisor = (wt * mask).sum(0)
    divisor[divisor == 0] = 1
    expected = base + 0.7 * (weighted * mask).sum(0) / divisor
    got = generalized_task_arithmetic(base, ds, w, consensus="sum", normalize=True, lambda_=0.7)
    assert torch.allclose(got, expected, atol=1e-6)
    mask_c = sign_consensus_mask(weighted, "count").float()
    expected_c = base + (weighted * mask_c).sum(0)
    assert torch.allclose(generalized_task_arithmetic(base, ds, w, consensus="count"), expected_c, atol=1e-6)


def test_trim_and_elect_match_peft():
    from peft.utils.merge_utils import calculate_majority_sign_mask, magnitude_based_pruning

    g = torch.Generator().manual_seed(3)
    d = torch.randn(3, 40, 30, generator=g)
    for density in (0.1, 0.5, 0.9):
        assert torch.equal(sparsify_magnitude(d[0], density), magnitude_based_pruning(d[0], density))
    assert torch.equal(sign_consensus_mask(d, "sum"), calculate_majority_sign_mask(d, "total"))
    assert torch.equal(sign_consensus_mask(d, "count"), calculate_majority_sign_mask(d, "frequency"))


def test_dare_rescale_and_expectation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 64, generator=g)
    assert torch.equal(sparsify_random(delta, 1.0, True), delta)  # p = 0: identity
    kept = sparsify_random(delta, 0.3, True, torch.Generator().manual_seed(1))
    nz = kept != 0
    assert torch.allclose(kept[nz], delta[nz] / 0.3)  # survivors rescaled by 1/(1-p)
    assert 0.25 < nz.float().mean() < 0.35
    # E[DARE(δ)] = δ: the mean over seeds approaches the task vector
    mean = torch.stack([sparsify_random(delta, 0.5, True, torch.Generator().manual_seed(s)) for s in range(400)])
    mean = mean.mean(0)
    err = (mean - delta).abs().mean() / delta.abs().mean()
    assert err < 0.06
    one = (sparsify_random(delta, 0.5, True, torch.Generator().manual_seed(0)) - delta).abs().mean()
    assert one / delta.abs().mean() > 0.5  # a single draw is far from it; the average is close


def test_gradient_and_filter_evaluation():
    assert evaluate_setting([0, 0.5, 1], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0, 1, 0], "x", 0.5) == pytest.approx(1.0)
    assert evaluate_setting([0, 1, 0], "x", 0.75) == pytest.approx(0.5)
    cond = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    assert evaluate_setting(cond, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate_setting(cond, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.3
    assert evaluate_setting(cond, "model.norm.weight", 1.0) == 0.5
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 1.0) is None


# ------------------------------------------------------------------------------- engine on tiny models


def _slerp_cfg(a, b, t, dtype="float32"):
    return {
        "merge_method": "slerp",
        "base_model": str(a),
        "dtype": dtype,
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": t},
    }


def test_engine_slerp_endpoints_exact(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    out0 = _merge(tmp_path, "t0", _slerp_cfg(tiny_model_dir, tiny_model_dir_b, 0))
    out1 = _merge(tmp_path, "t1", _slerp_cfg(tiny_model_dir, tiny_model_dir_b, 1))
    assert all(torch.equal(out0[n], a[n]) for n in a)
    assert all(torch.equal(out1[n], b[n]) for n in b)
    mid = _merge(tmp_path, "mid", _slerp_cfg(tiny_model_dir, tiny_model_dir_b, 0.3))
    n = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(mid[n], slerp(a[n], b[n], 0.3), atol=1e-6)


def test_engine_gradient_over_layers_and_filters(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    t = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    out = _merge(tmp_path, "grad", _slerp_cfg(tiny_model_dir, tiny_model_dir_b, t))
    # 2 layers: layer 0 is t=0 of the gradient, layer 1 is t=1
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    n = "lm_head.weight"
    assert torch.allclose(out[n], slerp(a[n], b[n], 0.5), atol=1e-6)


def test_engine_linear_and_task_arithmetic_formulas(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    lin = _merge(
        tmp_path,
        "lin",
        {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(tiny_model_dir), "parameters": {"weight": 1.0}},
                {"model": str(tiny_model_dir_b), "parameters": {"weight": 3.0}},
            ],
        },
    )
    ta = _merge(
        tmp_path,
        "ta",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_model_dir),
            "dtype": "float32",
            "parameters": {"lambda": 0.5},
            "models": [{"model": str(tiny_model_dir_b), "parameters": {"weight": 0.8}}],
        },
    )
    for n in a:
        assert torch.allclose(lin[n], (a[n] + 3 * b[n]) / 4, atol=1e-6)
        assert torch.allclose(ta[n], a[n] + 0.5 * 0.8 * (b[n] - a[n]), atol=1e-6)


def _dare_cfg(a, b, method, density, **params):
    return {
        "merge_method": method,
        "base_model": str(a),
        "dtype": "float32",
        "parameters": params,
        "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 0.6, "density": density}}],
    }


def test_dare_p0_equals_task_arithmetic_and_is_seeded(tmp_path, tiny_model_dir, tiny_model_dir_b):
    ta = _merge(tmp_path, "ta", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "task_arithmetic", 1.0))
    d0 = _merge(tmp_path, "d0", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "dare_linear", 1.0))
    assert all(torch.equal(ta[n], d0[n]) for n in ta)
    r1 = _merge(tmp_path, "r1", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "dare_ties", 0.5), seed=7)
    r2 = _merge(tmp_path, "r2", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "dare_ties", 0.5), seed=7)
    r3 = _merge(tmp_path, "r3", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "dare_ties", 0.5), seed=8)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
    n = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(r1[n], r3[n])
    # single fine-tune, dare_ties: θ = θ_base + w·δ' where δ' keeps ~half of δ scaled by 2
    a = _tensors(tiny_model_dir)
    changed = r1[n] - a[n]
    frac = (changed != 0).float().mean()
    assert 0.4 < frac < 0.6


def test_ties_engine_matches_formula(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    out = _merge(tmp_path, "ties", _dare_cfg(tiny_model_dir, tiny_model_dir_b, "ties", 0.3))
    for n in ("model.layers.1.self_attn.o_proj.weight", "model.norm.weight"):
        delta = sparsify_magnitude(b[n] - a[n], 0.3)
        # one model: the election keeps every kept entry, normalize divides 0.6·δ by 0.6 -> θ_base + trimmed δ
        expected = torch.where(delta != 0, a[n] + delta, a[n])
        assert torch.allclose(out[n], expected, atol=1e-6)


def test_chunked_streaming_equals_whole_tensor(tmp_path, monkeypatch, tiny_model_dir, tiny_model_dir_b):
    cfg = _slerp_cfg(tiny_model_dir, tiny_model_dir_b, 0.4)
    whole = _merge(tmp_path, "whole", cfg)
    monkeypatch.setattr(methods, "CHUNK_ELEMS", 1000)  # embeddings/mlp become many row chunks
    chunked = _merge(tmp_path, "chunked", cfg)
    assert all(torch.allclose(whole[n], chunked[n], atol=1e-6) for n in whole)


def test_sharded_output_and_input_roundtrip(tmp_path, tiny_model_dir, tiny_model_dir_b):
    out = tmp_path / "sharded"
    merge_models(
        validate_config(_slerp_cfg(tiny_model_dir, tiny_model_dir_b, 0.5, "bfloat16")),
        out,
        shard_size="60KB",
        progress=False,
        log=lambda m: None,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    merged = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    # a sharded folder is a valid input: slerp(out, b, 0) == out
    again = _merge(tmp_path, "again", _slerp_cfg(out, tiny_model_dir_b, 0, "bfloat16"))
    assert all(torch.equal(again[n], merged[n]) for n in merged)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert "slerp" in (out / "README.md").read_text()


def test_missing_required_weight_is_an_error(tiny_model_dir, tiny_model_dir_b, tmp_path):
    cfg = validate_config(
        {
            "merge_method": "ties",
            "base_model": str(tiny_model_dir),
            "models": [{"model": str(tiny_model_dir_b)}],
        }
    )
    with pytest.raises(TunekitError, match="missing required parameter 'weight'"):
        merge_models(cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_tokenizer_source_base_merges_embeddings_with_the_method(tmp_path, tiny_model_dir, tiny_model_dir_b):
    a, b = _tensors(tiny_model_dir), _tensors(tiny_model_dir_b)
    # mergekit 0.1.5: with identical vocabularies the aligned embeddings are merged by the config's method
    # (the old embed_slerp switch is accepted and ignored, as mergekit does)
    raw = {**_slerp_cfg(tiny_model_dir, tiny_model_dir_b, 0.3), "tokenizer_source": "base"}
    raw["parameters"] = {"t": 0.3, "embed_slerp": False}
    out = _merge(tmp_path, "es", raw)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.allclose(out[n], slerp(a[n], b[n], 0.3), atol=1e-6)
