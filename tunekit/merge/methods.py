"""Merge methods: pure tensor functions plus a registry of method specs that the streaming engine drives.

Semantics follow mergekit (parameter names, defaults, `normalize`/`rescale`/`lambda`, TIES sign election
by 'sum', task vectors relative to `base_model`). All math is done in float32 by the engine. Where PEFT
already has the operation (`peft.utils.merge_utils.magnitude_based_pruning`,
`calculate_majority_sign_mask`) it is reused; SLERP, the generalized task-arithmetic combination and the
seeded DARE mask are written here because no library offers them in a chunk-streaming, reproducible form.

Methods that work element by element (linear, slerp after a statistics pass, task_arithmetic, dare_*) run
on row chunks of a tensor, so even a 150k x 4k embedding is never held in float32 as a whole; TIES needs
the whole tensor for its magnitude top-k.
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
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta * mask.view(delta.shape)


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
        """Row ranges covering the tensor with <= CHUNK_ELEMS elements each; [None] for 0/1-d or small
        tensors."""
        if len(self.shape) < 2 or math.prod(self.shape) <= CHUNK_ELEMS:
            return [None]
        row = math.prod(self.shape[1:])
        step = max(1, CHUNK_ELEMS // row)
        return [(r, min(r + step, self.shape[0])) for r in range(0, self.shape[0], step)]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its mergekit parameters (name -> default, REQUIRED if none) and its streaming function.

    `merge(inputs, params, tensor_params, seed)` yields float32 row chunks of the merged tensor in order;
    `tensor_params[i]` is the per-model parameter dict for input i (empty for the base model in task-vector
    methods). `needs_base`: task-vector methods need `base_model`.
    """

    name: str
    global_params: dict[str, Any]
    tensor_params: dict[str, Any]
    merge: Callable[[TensorInputs, dict[str, Any], list[dict[str, Any]], int], Iterator[torch.Tensor]]
    needs_base: bool = False
    reference: str = ""
    base_tensor_params: bool = field(default=False)  # whether the base model takes tensor parameters


def _merge_linear(
    inputs: TensorInputs, params: dict, tparams: list[dict], seed: int
) -> Iterator[torch.Tensor]:
    weights = [tp["weight"] for tp in tparams]
    for rows in inputs.chunks():
        yield linear([inputs.read(i, rows) for i in range(len(inputs))], weights, params["normalize"])


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


def _gta(sparsification: str | None, consensus: str | None) -> Callable[..., Iterator[torch.Tensor]]:
    def merge(inputs: TensorInputs, params: dict, tparams: list[dict], seed: int) -> Iterator[torch.Tensor]:
        b = inputs.base_index
        assert b is not None
        others = [i for i in range(len(inputs)) if i != b]
        chunks = [None] if sparsification == "magnitude" else inputs.chunks()
        for ci, rows in enumerate(chunks):
            base = inputs.read(b, rows)
            deltas = []
            for i in others:
                delta = inputs.read(i, rows).sub_(base)
                density = float(tparams[i]["density"])
                if sparsification == "magnitude":
                    delta = sparsify_magnitude(delta, density)
                elif sparsification == "random":
                    gen = torch.Generator().manual_seed(tensor_seed(seed, inputs.name, i, ci))
                    delta = sparsify_random(delta, density, bool(params["rescale"]), gen)
                deltas.append(delta)
            yield generalized_task_arithmetic(
                base,
                deltas,
                [float(tparams[i]["weight"]) for i in others],
                consensus=consensus,
                normalize=bool(params["normalize"]),
                lambda_=float(params["lambda"]),
            )

    return merge


def _gta_spec(
    name: str,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> MethodSpec:
    return MethodSpec(
        name=name,
        global_params={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        tensor_params={"weight": REQUIRED, "density": 1.0},
        merge=_gta(sparsification, consensus),
        needs_base=True,
        reference=reference,
    )


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
    ),
    "task_arithmetic": _gta_spec("task_arithmetic", None, None, False, False, "Ilharco et al. 2023"),
    "ties": _gta_spec("ties", "magnitude", "sum", True, False, "Yadav et al. 2023"),
    "dare_ties": _gta_spec("dare_ties", "random", "sum", False, True, "Yu et al. 2024"),
    "dare_linear": _gta_spec("dare_linear", "random", None, False, True, "Yu et al. 2024"),
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
