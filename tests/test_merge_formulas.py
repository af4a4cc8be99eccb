"""Hand cases for the mergekit methods added to `tunekit.merge.methods`, and DELLA's statistics."""

from __future__ import annotations

import math

import pytest
import torch

from tunekit.merge.methods import (
    della_keep_probabilities,
    karcher_mean,
    model_stock,
    nuslerp,
    rescale_l1,
    sce,
    slerp,
    sparsify_breadcrumbs,
    sparsify_della,
    sparsify_magnitude,
)


def test_breadcrumbs_drops_outliers_and_smallest():
    d = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -0.7, 3.0, 0.4])
    # n=10, density 0.5 -> k=5, gamma 0.1 -> the single largest |δ| (-5) goes, then the 4 smallest
    out = sparsify_breadcrumbs(d, 0.5, 0.1)
    assert out.tolist() == pytest.approx([0, 0, 0, 2.0, 0, 1.0, 0, -0.7, 3.0, 0.4])
    # gamma 0: plain magnitude top-k
    assert torch.equal(sparsify_breadcrumbs(d, 0.5, 0.0), sparsify_magnitude(d, 0.5))
    # the outlier cut shrinks to keep k: density 0.95 -> k=9, n_bot = max(0, 10-9-1) = 0
    assert (sparsify_breadcrumbs(d, 0.95, 0.5) != 0).sum() == 9
    assert torch.equal(sparsify_breadcrumbs(d, 1.0, 0.1), d)


def test_rescale_l1_hand_case():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = torch.tensor([0.0, -2.0, 0.0, -4.0])
    assert torch.allclose(rescale_l1(d, kept), kept * 10 / 6)
    assert torch.equal(rescale_l1(d, torch.zeros(4)), torch.zeros(4))  # nothing kept: no division by zero


def test_della_probabilities_hand_case_and_statistics():
    # |δ| ranks 1, 3, 2 -> (r-1)/(m-1) = 0, 1, 0.5 -> p = 0.3 + 0.4·that
    p = della_keep_probabilities(torch.tensor([[0.1, -3.0, 2.0]]), 0.5, 0.2)
    assert p[0].tolist() == pytest.approx([0.3, 0.7, 0.5])
    assert della_keep_probabilities(torch.tensor([0.1, -3.0, 2.0]), 0.5, 0.2).shape == (3,)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(300, 400, generator=g)
    kept = sparsify_della(d, 0.4, 0.15, torch.Generator().manual_seed(1))
    nz = kept != 0
    assert torch.equal(kept[nz], d[nz])  # survivors unchanged (rescale is separate)
    assert nz.float().mean().item() == pytest.approx(0.4, abs=0.01)  # row mean of p is the density
    big = d.abs() > d.abs().median()
    # keep rate rises with magnitude: top half ≈ 0.4 + 0.075, bottom half ≈ 0.4 − 0.075
    assert nz[big].float().mean().item() == pytest.approx(0.475, abs=0.01)
    assert nz[~big].float().mean().item() == pytest.approx(0.325, abs=0.01)
    again = sparsify_della(d, 0.4, 0.15, torch.Generator().manual_seed(1))
    assert torch.equal(kept, again)
    assert not torch.equal(kept, sparsify_della(d, 0.4, 0.15, torch.Generator().manual_seed(2)))
    # with mergekit's rescale the L1 norm is restored
    assert rescale_l1(d, kept).abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)


def test_model_stock_hand_cases():
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    assert torch.equal(model_stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]), base)
    # identical task vectors: cos 1 -> t = 2/(1+1) = 1 -> their average
    w = torch.tensor([1.0, 1.0])
    assert torch.allclose(model_stock(base, [w, w.clone()]), w)
    # cos 0.5 with k=2: t = 2·0.5/1.5 = 2/3
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    assert torch.allclose(model_stock(base, [a, b]), (2 / 3) * (a + b) / 2, atol=1e-6)
    # filter_wise: row 0 has cos 1 (t=1), row 1 cos 0 (t=0)
    base2 = torch.ones(2, 2)
    x = base2 + torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    y = base2 + torch.tensor([[2.0, 4.0], [0.0, 1.0]])
    out = model_stock(base2, [x, y], filter_wise=True)
    assert torch.allclose(out[0], (x[0] + y[0]) / 2) and torch.allclose(out[1], base2[1])


def test_nuslerp_hand_cases():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(nuslerp(0.5, a, b), torch.tensor([math.sqrt(2), math.sqrt(2)]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    # flatten: the same as slerp of the whole tensor
    assert torch.allclose(nuslerp(0.3, x, y), slerp(x, y, 0.3), atol=1e-5)
    rows = nuslerp(0.3, x, y, flatten=False)
    for i in range(3):
        assert torch.allclose(rows[i], slerp(x[i], y[i], 0.3), atol=1e-5)
    cols = nuslerp(0.3, x, y, row_wise=True, flatten=False)
    for j in range(5):
        assert torch.allclose(cols[:, j], slerp(x[:, j], y[:, j], 0.3), atol=1e-5)
    # colinear: lerp
    assert torch.allclose(nuslerp(0.25, a, 3 * a), 0.75 * a + 0.25 * 3 * a)


def test_karcher_hand_case_and_fixed_point():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    # equal weights: direction (e1+e2)/√2, norm = mean of the norms = 2
    assert torch.allclose(karcher_mean([e1, e2]), 2 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(20, generator=g) + 2 for _ in range(3)]
    m = karcher_mean(xs, max_iter=100, tol=1e-7)
    assert m.norm().item() == pytest.approx(sum(x.norm().item() for x in xs) / 3, rel=1e-5)
    mu = m / m.norm()
    # at the Karcher mean the log-map vectors sum to zero
    tangent = torch.zeros(20)
    for x in xs:
        u = x / x.norm()
        c = torch.clamp(mu @ u, -1, 1)
        th = torch.arccos(c)
        tangent += th / torch.sin(th) * (u - c * mu)
    assert tangent.norm().item() < 1e-4
    assert torch.equal(karcher_mean([e1]), e1)


def test_sce_hand_case():
    base = torch.zeros(4)
    t1, t2 = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, -2.0, 0.0])
    # sign of Σδ = [+, 0→+, 0→+, 0→+]; w = mean(δ²)/Σ = [1.5, 3.5]/5
    assert torch.allclose(sce(base, [t1, t2]), torch.tensor([2.4, 1.0, 2.0, 0.0]), atol=1e-6)
    # select_topk 0.5: variances [1, 1, 4, 0] -> k = int(3·0.5) = 1 -> only entry 2 survives
    assert torch.allclose(sce(base, [t1, t2], select_topk=0.5), torch.tensor([0.0, 0.0, 2.0, 0.0]), atol=1e-6)
    b = torch.full((4,), 0.5)
    assert torch.allclose(sce(b, [b + t1, b + t2]), b + torch.tensor([2.4, 1.0, 2.0, 0.0]), atol=1e-6)


def test_whole_tensor_methods_combine_in_row_chunks(monkeypatch):
    """TIES/DELLA/breadcrumbs prune over the whole tensor but combine row chunk by row chunk: same result."""
    from tunekit.merge import methods

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(40, 30, generator=g) for _ in range(3)]
    inputs = methods.TensorInputs("w", (40, 30), [lambda rows, x=x: x.clone() if rows is None else
                                                  x[rows[0]:rows[1]].clone() for x in tensors], 0)
    tp = [{}, {"weight": 0.7, "density": 0.5, "gamma": 0.05, "epsilon": 0.1},
          {"weight": 0.4, "density": 0.3, "gamma": 0.05, "epsilon": 0.1}]
    for name in ("ties", "breadcrumbs_ties", "della"):
        spec = methods.METHODS[name]
        params = dict(spec.global_params)
        whole = torch.cat(list(spec.merge(inputs, params, tp, 3)))
        monkeypatch.setattr(methods, "CHUNK_ELEMS", 200)
        chunked = list(spec.merge(inputs, params, tp, 3))
        monkeypatch.setattr(methods, "CHUNK_ELEMS", 8 * 1024 * 1024)
        assert len(chunked) > 1 and torch.allclose(torch.cat(chunked), whole, atol=1e-6), name


def test_della_streams_row_chunks_with_the_whole_tensor_masks(monkeypatch):
    """DELLA reads row chunks only (two passes with `rescale`), draws the masks of whole-tensor pruning for a given
    seed, and its rescale restores each task vector's whole-tensor L1 norm."""
    from tunekit.merge import methods

    monkeypatch.setattr(methods, "CHUNK_ELEMS", 600)
    g = torch.Generator().manual_seed(0)
    base, ft = torch.randn(90, 40, generator=g), torch.randn(90, 40, generator=g)
    asked = []

    def reader(x):
        def read(rows):
            asked.append(rows)
            return x.clone() if rows is None else x[rows[0] : rows[1]].clone()

        return read

    inputs = methods.TensorInputs("w", (90, 40), [reader(base), reader(ft)], 0)
    assert len(inputs.chunks()) > 1
    tp = [{}, {"weight": 1.0, "density": 0.4, "epsilon": 0.1}]
    seed_gen = torch.Generator().manual_seed(methods.tensor_seed(7, "w", 1, 0))
    kept = sparsify_della(ft - base, 0.4, 0.1, seed_gen)  # whole tensor at once, same generator seed
    for name in ("della_linear", "della"):
        params = {**methods.METHODS[name].global_params, "rescale": False}
        out = torch.cat(list(methods.METHODS[name].merge(inputs, params, tp, 7)))
        assert None not in asked and torch.equal(out - base != 0, kept != 0), name
    asked.clear()
    params = dict(methods.METHODS["della_linear"].global_params)  # rescale: true
    out = torch.cat(list(methods.METHODS["della_linear"].merge(inputs, params, tp, 7)))
    assert None not in asked and len(asked) == 4 * len(inputs.chunks())  # two passes over base and model
    assert torch.allclose(out - base, rescale_l1(ft - base, kept), atol=1e-5)
    assert (out - base).abs().sum().item() == pytest.approx((ft - base).abs().sum().item(), rel=1e-5)
