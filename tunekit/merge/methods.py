"""Merge methods: pure tensor functions plus a registry of method specs that the streaming engine drives.

Semantics follow mergekit (parameter names, defaults, `normalize`/`rescale`/`lambda`, TIES sign election
by 'sum', task vectors relative to `base_model`). All math is done in float32 by the engine. Where PEFT
already has the operation (`peft.utils.merge_utils.magnitude_based_pruning`,
`calculate_majority_sign_mask`) it is reused; SLERP, the generalized task-arithmetic combination and the
seeded DARE mask are written here because no library offers them in a chunk-streaming, reproducible form.

Methods that work element by element (linear, slerp after a statistics pass, task_arithmetic, dare_*) or row by
row (della_*: ranks within a row, plus a norms pass for `rescale`) run on row chunks of a tensor, so even a
150k x 4k embedding is never held in float32 as a whole; TIES needs the whole tensor for its magnitude top-k.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunekit.errors import TunekitError

#: Rows are read and merged in chunks of at most this many elements (32 MiB in float32).
CHUNK_ELEMS = 8 * 1024 * 1024
DOT_THRESHOLD = 0.9995
EPS = 1e-8
REQUIRED = object()


# --------------------------------------------------------------------------------------------- pure functions


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation: lerp(a, b, t) = (1-t)·a + t·b."""
    return (1.0 - t) * a + t * b


def slerp_coefficients(
    dot: float, norm_a: float, norm_b: float, t: float, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> tuple[float, float]:
    """Scalars (s0, s1) with slerp(a, b, t) = s0·a + s1·b, from <a,b>, ||a||, ||b||.

    s0 = sin((1-t)Ω)/sinΩ, s1 = sin(tΩ)/sinΩ with cosΩ = <a,b>/(||a||·||b||) (Shoemake 1985). Falls back
    to lerp
    (1-t, t) when |cosΩ| > `dot_threshold` (near-colinear, as mergekit) or either norm is <= `eps` (zero
    tensor;
    mergekit would rescale the other endpoint by sin(tπ/2) there, which lerp avoids).
    """
    if t == 0:
        return 1.0, 0.0
    if t == 1:
        return 0.0, 1.0
    if norm_a <= eps or norm_b <= eps:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation: slerp(a,b,t) = sin((1-t)Ω)/sinΩ·a + sin(tΩ)/sinΩ·b, cosΩ = <a,b>/(|a||b|).

    The whole tensor is one vector (as mergekit). t=0 returns a, t=1 returns b exactly; lerp fallback for
    near-colinear or zero-norm tensors (see `slerp_coefficients`).
    """
    a64, b64 = a.double(), b.double()
    s0, s1 = slerp_coefficients(
        float((a64 * b64).sum()), float(a64.norm()), float(b64.norm()), t, dot_threshold
    )
    if s1 == 0.0:
        return a.clone()
    if s0 == 0.0:
        return b.clone()
    return s0 * a + s1 * b


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average: linear(x, w) = Σ w_i·x_i, divided by Σ w_i when `normalize` (Wortsman et al.
    2022)."""
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < EPS:
            raise TunekitError("linear: the weights sum to zero; cannot normalize (set normalize: false)")
        out.div_(total)
    return out


def sparsify_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the int(density·n) largest-|δ| entries, zero the rest (Yadav et al. 2023).

    Same as `peft.utils.merge_utils.magnitude_based_pruning` (checked in tests); written here because
    importing peft in the merge process costs ~0.5 GB of RSS (it pulls in transformers and bitsandbytes).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))  # mergekit keeps at least one entry for a positive density
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta * mask.view(delta.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's `rescale` for magnitude/outlier/DELLA pruning: kept·‖δ‖₁/‖kept‖₁ (unchanged if either norm < eps)."""
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def sparsify_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction by |δ| (outliers) and the smallest, keeping int(density·n).

    Sorted ascending by |δ|, entries [n − k − ⌊γn⌋, n − ⌊γn⌋) survive with k = int(density·n); the outlier cut
    shrinks when needed to keep k (Davari & Belilovsky 2023, arXiv:2312.06795; indices as mergekit).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - k - n_top)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n_bot + k]] = True
    return delta * mask.view(delta.shape)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: p = density − ε + 2ε·(r − 1)/(m − 1), r the 1-based |δ| rank within its row of m entries.

    Bigger entries are kept with higher probability; the row mean of p is `density` (Deep et al. 2024,
    arXiv:2406.11617). Rows are dim 1 of the tensor as mergekit does (1-d tensors are one row).
    """
    x = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    order = torch.argsort(x.abs(), dim=1)
    # the rank of each entry is the inverse permutation of `order` (what a second argsort gives), by a scatter
    positions = torch.arange(x.shape[1], dtype=order.dtype).view(1, -1, *([1] * (x.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(torch.float32) + 1
    del order, positions
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp(min=1)
    rank_norm = ((ranks - lo) / span).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def della_keep_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DELLA's drop mask: m ~ Bernoulli(`della_keep_probabilities`), a bool tensor shaped like `delta`.

    The ranks are per row, so rows are done in chunks (the two int64 argsorts never cover the whole tensor). One
    Bernoulli draw is taken from `generator` per entry, in row-major order (torch's CPU kernel is serial), so the mask
    of a tensor does not depend on how its rows are split between calls sharing one generator.
    """
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    out = torch.empty(rows.shape, dtype=torch.bool)
    step = max(1, CHUNK_ELEMS // 4 // max(1, math.prod(rows.shape[1:])))
    for r in range(0, rows.shape[0], step):
        keep = torch.bernoulli(della_keep_probabilities(rows[r : r + step], density, epsilon), generator=generator)
        out[r : r + step] = keep.to(torch.bool)
    return out.reshape(delta.shape)


def sparsify_della(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DELLA drop: δ' = m ⊙ δ with m ~ Bernoulli(`della_keep_probabilities`); `rescale` is applied by the caller."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    return delta * della_keep_mask(delta, density, epsilon, generator)


def sparsify_random(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: δ' = m ⊙ δ / (1-p), m ~ Bernoulli(1-p), density = 1-p (Yu et al. 2024); no 1/(1-p) without rescale.

    Written here (not PEFT's `random_pruning`) to take a seeded generator, so merges are reproducible.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * mask
    if rescale:
        out.div_(density)
    return out


def sign_consensus_mask(weighted_deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES elect: γ = sign(Σ_i w_i·δ_i) ('sum') or sign(Σ_i sign(w_i·δ_i)) ('count'); mask_i = [sign = γ].

    Zero sums elect +1, as mergekit and PEFT do. Same as `peft.utils.merge_utils.calculate_majority_sign_mask`
    (checked in tests); not imported from peft to keep the merge process light (see `sparsify_magnitude`).
    """
    sign = weighted_deltas.sign()
    if method == "sum":
        total = weighted_deltas.sum(dim=0)
    elif method == "count":
        total = sign.sum(dim=0)
    else:
        raise TunekitError(f"unknown consensus method '{method}' (sum or count)")
    majority = torch.where(total >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == majority


def generalized_task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: str | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """θ = θ_base + λ·Σ_i m_i·w_i·δ_i / D over sparsified task vectors δ_i (Ilharco et al. 2023).

    With `consensus` ('sum'/'count') m_i is the TIES sign-election mask of `sign_consensus_mask` (Yadav et
    al. 2023), else 1. D = Σ_i m_i·w_i (elementwise, 0 -> 1) when `normalize`, else 1; with all w_i = 1 that
    is TIES's disjoint mean. Computed tensor by tensor (no stacking) to keep memory at a few chunks.
    """
    if not deltas:
        return base.clone()
    w = [float(x) for x in weights]
    weighted = [d * wi for d, wi in zip(deltas, w, strict=True)]
    if consensus:
        if consensus == "sum":
            total = weighted[0].clone()
            for x in weighted[1:]:
                total.add_(x)
        elif consensus == "count":
            total = weighted[0].sign()
            for x in weighted[1:]:
                total.add_(x.sign())
        else:
            raise TunekitError(f"unknown consensus method '{consensus}' (sum or count)")
        positive = total >= 0
        del total
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for x, wi in zip(weighted, w, strict=True):
            agree = torch.where(positive, x > 0, x < 0)  # sign(x) == elected sign (zeros never agree)
            mixed.add_(x * agree)
            if divisor is not None:
                divisor.add_(agree.to(divisor.dtype), alpha=wi)
        if divisor is not None:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    else:
        mixed = weighted[0]
        for x in weighted[1:]:
            mixed.add_(x)
        if normalize:
            total_w = sum(w)
            mixed.div_(total_w if abs(total_w) >= EPS else 1.0)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: θ = t·mean(θ_i) + (1−t)·θ_base, t = k·cosθ/(1+(k−1)·cosθ) (Jang et al. 2024, arXiv:2403.19522).

    cosθ is the mean pairwise cosine of the k task vectors θ_i − θ_base, over the whole tensor or per output row
    (`filter_wise`); where 1+(k−1)cosθ ≈ 0 the base is kept (t = 0), as mergekit.
    """
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=1e-6)
            cos.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / torch.where(singular, 1.0, denominator))
    average = ws[0].clone()
    for w in ws[1:]:
        average.add_(w)
    average.div_(k)
    return (t * average + (1 - t) * w0).reshape(shape)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """SLERP of v0→v1 at t, over the whole tensor (`flatten`), its rows, or its columns (`row_wise`, mergekit's dim 0).

    Each vector pair: (sin((1−t)Ω)·v0 + sin(tΩ)·v1)/sinΩ with cosΩ = ⟨v0,v1⟩/(‖v0‖‖v1‖); lerp where 1−cos²Ω ≤ eps²
    (Shoemake 1985; mergekit's `nuslerp`).
    """
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del ua, ub
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher (Riemannian) mean of the directions x_i/‖x_i‖ on the unit sphere, times the mean norm Σ‖x_i‖/n.

    Fixed point of μ ← exp_μ(Σ α_i·log_μ(u_i)) with equal α_i over non-zero inputs, log_μ(u) = θ/sinθ·(u − cosθ·μ),
    at most `max_iter` steps, stopping when ‖tangent‖ < `tol` (Karcher 1977; as mergekit's `karcher`).
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(torch.linalg.vector_norm(x)) for x in tensors]
    units = [x / n if n != 0 else torch.zeros_like(x) for x, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units, strict=True):
        mean.add_(u, alpha=w)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = float(torch.linalg.vector_norm(mean))
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE: Select the top `select_topk` of entries by variance across the task vectors δ_i, Calculate weights
    w_i = mean(δ_i²)/Σ_j mean(δ_j²), Erase entries disagreeing with sign(Σ δ_i): θ_base + Σ w_i m_i δ_i / Σ w_i m_i.

    FuseChat 2.0 (Wan et al. 2024, arXiv:2408.07990), as mergekit's `sce`.
    """
    if not tensors:
        return base.clone()
    tvs = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(base)
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    erase = sign_consensus_mask(tvs, "sum").to(tvs.dtype)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *([1] * (tvs.dim() - 1))) * erase
    merged = (tvs * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
    return base + merged


def tensor_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one (tensor, model, chunk): sha256 of the parts, independent of
    PYTHONHASHSEED."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------- streaming dr


class TensorInputs:
    """One output tensor's inputs: `read(i, rows)` gives model i's tensor (rows [r0, r1)) in float32."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        readers: Sequence[Callable[..., torch.Tensor]],
        base_index: int | None,
    ) -> None:
        self.name = name
        self.shape = shape
        self._readers = readers
        self.base_index = base_index

    def __len__(self) -> int:
        return len(self._readers)

    def read(self, i: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._readers[i](rows)

    def chunks(self) -> list[tuple[int, int] | None]:
        return row_chunks(self.shape)


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Row ranges covering a tensor of `shape` with <= CHUNK_ELEMS elements each; [None] for 0/1-d or small
    tensors."""
    if len(shape) < 2 or math.prod(shape) <= CHUNK_ELEMS:
        return [None]
    row = math.prod(shape[1:])
    step = max(1, CHUNK_ELEMS // row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its mergekit parameters (name -> default, REQUIRED if none) and its streaming function.

    `merge(inputs, params, tensor_params, seed)` yields float32 row chunks of the merged tensor in order;
    `tensor_params[i]` is the per-model parameter dict for input i (empty for the base model in task-vector
    methods). `needs_base`: the method needs `base_model`; `uses_base`: the base is special (task vectors are
    relative to it), else it is one more input. `inputs`/`non_base`: allowed (min, max) counts, None = no limit.
    """

    name: str
    global_params: dict[str, Any]
    tensor_params: dict[str, Any]
    merge: Callable[[TensorInputs, dict[str, Any], list[dict[str, Any]], int], Iterator[torch.Tensor]]
    needs_base: bool = False
    reference: str = ""
    base_tensor_params: bool = field(default=False)  # whether the base model takes tensor parameters
    uses_base: bool | None = None
    inputs: tuple[int, int | None] = (1, None)
    non_base: tuple[int, int | None] = (0, None)

    @property
    def base_is_special(self) -> bool:
        return self.needs_base if self.uses_base is None else self.uses_base

    def check_inputs(self, count: int, has_base: bool) -> str | None:
        """Why `count` inputs (one of them the base if `has_base`) cannot be merged by this method, or None."""
        lo, hi = self.inputs
        if count < lo or (hi is not None and count > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return f"merge_method '{self.name}' takes {want} input models (base included), got {count}"
        non_base = count - int(has_base and self.base_is_special)
        lo, hi = self.non_base
        if non_base < lo or (hi is not None and non_base > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return f"merge_method '{self.name}' takes {want} models besides the base, got {non_base}"
        return None


def _merge_linear(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    weights = [tp["weight"] for tp in tparams]
    for rows in inputs.chunks():
        yield linear([inputs.read(i, rows) for i in range(len(inputs))], weights, params["normalize"])


def _merge_passthrough(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    scale = tparams[0].get("scale")
    for rows in inputs.chunks():
        x = inputs.read(0, rows)
        yield x if scale is None else x.mul_(float(scale))


def _merge_slerp(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    if len(inputs) == 1:
        for rows in inputs.chunks():
            yield inputs.read(0, rows)
        return
    ia = inputs.base_index if inputs.base_index is not None else 0
    ib = 1 - ia
    t = float(params["t"])
    chunks = inputs.chunks()
    if len(chunks) == 1:
        yield slerp(inputs.read(ia), inputs.read(ib), t)
        return
    # Pass 1: <a,b>, ||a||², ||b||² accumulated in float64 over row chunks; pass 2: s0·a + s1·b per chunk.
    dot = na = nb = 0.0
    if t not in (0, 1):
        for rows in chunks:
            a, b = inputs.read(ia, rows), inputs.read(ib, rows)
            dot += float(torch.dot(a.reshape(-1), b.reshape(-1)))
            na += float(torch.dot(a.reshape(-1), a.reshape(-1)))
            nb += float(torch.dot(b.reshape(-1), b.reshape(-1)))
            del a, b
    s0, s1 = slerp_coefficients(dot, math.sqrt(na), math.sqrt(nb), t)
    for rows in chunks:
        if s1 == 0.0:
            yield inputs.read(ia, rows)
        elif s0 == 0.0:
            yield inputs.read(ib, rows)
        else:
            a = inputs.read(ia, rows)
            a.mul_(s0).add_(inputs.read(ib, rows), alpha=s1)
            yield a


#: sparsifications that need the whole tensor (a rank over it); DARE's Bernoulli drop and DELLA (ranks within a row,
#: see `_merge_della`) stream by rows.
_WHOLE_TENSOR_SPARSIFICATION = {"magnitude", "breadcrumbs"}


class _PackedMasks:
    """Bool row-chunk masks kept at one bit per entry (numpy's packbits) between two passes over a tensor."""

    def __init__(self) -> None:
        self._chunks: list[tuple[Any, tuple[int, ...]]] = []

    def append(self, mask: torch.Tensor) -> None:
        import numpy as np

        self._chunks.append((np.packbits(mask.reshape(-1).numpy()), tuple(mask.shape)))

    def __getitem__(self, k: int) -> torch.Tensor:
        import numpy as np

        packed, shape = self._chunks[k]
        bits = np.unpackbits(packed, count=math.prod(shape)).view(np.bool_)
        return torch.from_numpy(bits).reshape(shape)


def _merge_della(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int, consensus: str | None
) -> Iterator[torch.Tensor]:
    """DELLA (MagPrune, optional `rescale`, then task arithmetic or TIES) row chunk by row chunk.

    MagPrune ranks |δ| within each row, so a chunk of whole rows is pruned exactly as in the whole tensor, and the
    masks come from one generator per (tensor, model) consumed in row order (`della_keep_mask`): the same masks as
    pruning the whole tensor at once. `rescale` (kept·‖δ‖₁/‖kept‖₁) needs both norms over the whole tensor, so then
    pass 1 draws the masks (kept at one bit per entry) and sums the norms, and pass 2 re-reads the rows and applies
    masks, scale and the combination. Peak memory is a few float32 chunks plus the bit masks.
    """
    b = inputs.base_index
    assert b is not None
    others = [i for i in range(len(inputs)) if i != b]
    chunks = inputs.chunks()
    density = {i: float(tparams[i]["density"]) for i in others}
    epsilon = {i: float(tparams[i]["epsilon"]) for i in others}
    weights = [float(tparams[i]["weight"]) for i in others]
    gens = {i: torch.Generator().manual_seed(tensor_seed(seed, inputs.name, i, 0)) for i in others}
    pruned = [i for i in others if 0 < density[i] < 1]  # density >= 1 keeps δ, <= 0 drops it: no mask, no rescale

    def combine(base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        return generalized_task_arithmetic(
            base, deltas, weights, consensus=consensus, normalize=bool(params["normalize"]),
            lambda_=float(params["lambda"]),
        )

    def unpruned(i: int, delta: torch.Tensor) -> torch.Tensor:
        return delta if density[i] >= 1 else torch.zeros_like(delta)

    masks: dict[int, _PackedMasks] = {}
    scale = dict.fromkeys(pruned, 1.0)
    if params["rescale"] and pruned:
        # pass 1: masks and the L1 norms of δ and of the kept entries (chunk sums in float32 as a whole-tensor sum
        # would be for a one-chunk tensor, added up in float64)
        masks = {i: _PackedMasks() for i in pruned}
        l1 = {i: [0.0, 0.0] for i in pruned}
        for rows in chunks:
            base = inputs.read(b, rows)
            for i in pruned:
                mag = inputs.read(i, rows).sub_(base).abs_()
                mask = della_keep_mask(mag, density[i], epsilon[i], gens[i])  # ranks of |δ|: the same as of δ
                l1[i][0] += float(mag.sum())
                l1[i][1] += float(mag.mul_(mask).sum())
                masks[i].append(mask)
                del mag, mask
            del base
        scale = {i: 1.0 if before < 1e-7 or after < 1e-7 else before / after for i, (before, after) in l1.items()}
    # δ' = mask ⊙ δ · scale (as `rescale_l1`; scale 1 without rescale), combined chunk by chunk; without rescale
    # the masks are drawn here, in the same row order
    for k, rows in enumerate(chunks):
        base = inputs.read(b, rows)
        deltas = []
        for i in others:
            delta = inputs.read(i, rows).sub_(base)
            if i not in pruned:
                deltas.append(unpruned(i, delta))
                continue
            delta.mul_(masks[i][k] if masks else della_keep_mask(delta, density[i], epsilon[i], gens[i]))
            if scale[i] != 1.0:
                delta.mul_(scale[i])
            deltas.append(delta)
        yield combine(base, deltas)


def _gta(sparsification: str | None, consensus: str | None) -> Callable[..., Iterator[torch.Tensor]]:
    def merge(inputs: TensorInputs, params: dict, tparams: list[dict], seed: int) -> Iterator[torch.Tensor]:
        if sparsification == "della":
            yield from _merge_della(inputs, params, tparams, seed, consensus)
            return
        b = inputs.base_index
        assert b is not None
        others = [i for i in range(len(inputs)) if i != b]
        chunks = [None] if sparsification in _WHOLE_TENSOR_SPARSIFICATION else inputs.chunks()
        rescale = bool(params["rescale"])
        for ci, rows in enumerate(chunks):
            base = inputs.read(b, rows)
            deltas = []
            for i in others:
                delta = inputs.read(i, rows).sub_(base)
                density = float(tparams[i]["density"])
                if sparsification == "random":
                    gen = torch.Generator().manual_seed(tensor_seed(seed, inputs.name, i, ci))
                    kept = sparsify_random(delta, density, rescale, gen)
                else:
                    if sparsification == "magnitude":
                        kept = sparsify_magnitude(delta, density)
                    elif sparsification == "breadcrumbs":
                        kept = sparsify_breadcrumbs(delta, density, float(tparams[i]["gamma"]))
                    else:
                        kept = delta
                    if rescale and sparsification is not None and kept is not delta:
                        kept = rescale_l1(delta, kept)
                deltas.append(kept)
                del delta, kept
            weights = [float(tparams[i]["weight"]) for i in others]
            # the sparsified task vectors are whole tensors here, but the combination is elementwise: do it in row
            # chunks so its temporaries (weighted copies, sign sums, divisor) stay chunk-sized
            parts = inputs.chunks() if rows is None else [rows]
            for part in parts:
                sl = slice(None) if part is None or rows is not None else slice(*part)
                yield generalized_task_arithmetic(
                    base[sl],
                    [d[sl] for d in deltas],
                    weights,
                    consensus=consensus,
                    normalize=bool(params["normalize"]),
                    lambda_=float(params["lambda"]),
                )
            del base, deltas

    return merge


def _gta_spec(
    name: str,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> MethodSpec:
    tensor_params: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsification == "breadcrumbs":
        tensor_params["gamma"] = 0.01
    if sparsification == "della":
        tensor_params["epsilon"] = 0.15
    return MethodSpec(
        name=name,
        global_params={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        tensor_params=tensor_params,
        merge=_gta(sparsification, consensus),
        needs_base=True,
        reference=reference,
    )


def _whole(inputs: TensorInputs, indices: Sequence[int]) -> list[torch.Tensor]:
    return [inputs.read(i) for i in indices]


def _merge_model_stock(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    b = inputs.base_index
    assert b is not None
    others = [i for i in range(len(inputs)) if i != b]
    yield model_stock(inputs.read(b), _whole(inputs, others), bool(params["filter_wise"]))


def _merge_nuslerp(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    b = inputs.base_index
    others = [i for i in range(len(inputs)) if i != b]
    w0, w1 = (float(tparams[i]["weight"]) for i in others)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    row_wise, flatten = bool(params["nuslerp_row_wise"]), bool(params["nuslerp_flatten"])
    v0, v1 = _whole(inputs, others)
    if b is None:
        yield nuslerp(t, v0, v1, row_wise, flatten)
        return
    base = inputs.read(b)
    yield base.add_(nuslerp(t, v0.sub_(base), v1.sub_(base), row_wise, flatten))


def _merge_karcher(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    yield karcher_mean(_whole(inputs, range(len(inputs))), int(params["max_iter"]), float(params["tol"]))


def _merge_sce(inputs: TensorInputs, params: dict, tparams: list[dict], seed: int) -> Iterator[torch.Tensor]:
    b = inputs.base_index
    assert b is not None
    others = [i for i in range(len(inputs)) if i != b]
    yield sce(inputs.read(b), _whole(inputs, others), float(params["select_topk"]))


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear",
        {"normalize": True},
        {"weight": REQUIRED},
        _merge_linear,
        reference="Model soups, Wortsman et al. 2022",
        base_tensor_params=True,
    ),
    "slerp": MethodSpec(
        "slerp",
        {"t": REQUIRED},
        {},
        _merge_slerp,
        reference="Shoemake 1985 (SLERP)",
        base_tensor_params=True,
        uses_base=True,
        inputs=(2, 2),
    ),
    "passthrough": MethodSpec(
        "passthrough",
        {},
        {"scale": None},
        _merge_passthrough,
        reference="mergekit passthrough (frankenmerges)",
        base_tensor_params=True,
        inputs=(1, 1),
    ),
    "task_arithmetic": _gta_spec("task_arithmetic", None, None, False, False, "Ilharco et al. 2023"),
    "ties": _gta_spec("ties", "magnitude", "sum", True, False, "Yadav et al. 2023"),
    "dare_ties": _gta_spec("dare_ties", "random", "sum", False, True, "Yu et al. 2024"),
    "dare_linear": _gta_spec("dare_linear", "random", None, False, True, "Yu et al. 2024"),
    "breadcrumbs": _gta_spec("breadcrumbs", "breadcrumbs", None, False, False, "Davari & Belilovsky 2023"),
    "breadcrumbs_ties": _gta_spec(
        "breadcrumbs_ties", "breadcrumbs", "sum", False, False, "Davari & Belilovsky 2023"
    ),
    "della": _gta_spec("della", "della", "sum", True, True, "Deep et al. 2024"),
    "della_linear": _gta_spec("della_linear", "della", None, False, True, "Deep et al. 2024"),
    "model_stock": MethodSpec(
        "model_stock",
        {"filter_wise": False},
        {},
        _merge_model_stock,
        needs_base=True,
        reference="Jang et al. 2024",
        inputs=(3, None),
    ),
    "nuslerp": MethodSpec(
        "nuslerp",
        {"nuslerp_row_wise": False, "nuslerp_flatten": True},
        {"weight": REQUIRED},
        _merge_nuslerp,
        reference="Shoemake 1985; mergekit nuslerp",
        uses_base=True,
        non_base=(2, 2),
    ),
    "karcher": MethodSpec(
        "karcher",
        {"max_iter": 10, "tol": 1e-5},
        {},
        _merge_karcher,
        reference="Karcher 1977",
        base_tensor_params=True,
    ),
    "sce": MethodSpec(
        "sce",
        {"select_topk": 1.0, "int8_mask": False},
        {},
        _merge_sce,
        needs_base=True,
        reference="Wan et al. 2024 (FuseChat 2.0)",
    ),
}


def register_method(spec: MethodSpec) -> None:
    """Add a merge method (e.g. from another tunekit module); its name becomes a valid `merge_method`."""
    METHODS[spec.name] = spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise TunekitError(
            f"merge_method '{name}' is not supported (supported: {', '.join(sorted(METHODS))}, adapter_sum)"
        )
    return METHODS[name]
