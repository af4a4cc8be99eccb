"""The merge plan: which output tensors a mergekit config makes, from which input tensors, with which method
parameters. Every name, shape and parameter is checked here, before the engine writes anything.

`models:` configs keep the base model's tensor names; `slices:` configs stack layer ranges as mergekit 0.1.5 does
(its gradient position t, its pre-layer / per-layer / post-layer order).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tunekit.errors import TunekitError
from tunekit.merge.config import MergeConfig, OutputSlice
from tunekit.merge.io import TensorInfo, normalize_dtype
from tunekit.merge.methods import METHODS, REQUIRED, MethodSpec
from tunekit.merge.sources import ModelSource, read_model_config

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_INPUT_EMBED_RE = re.compile(r"(embed_tokens|wte|wpe|embed_in|word_embeddings|embeddings)\.weight$")
_EMBED_RE = re.compile(r"(embed_tokens|wte|embed_in|word_embeddings|lm_head|embed_out)\.weight$")


def layer_fraction(name: str, num_layers: int) -> float:
    """mergekit 0.1.5's gradient position: layer i of L -> i/(L-1) (1 for a single layer); every non-layer
    tensor (embeddings, final norm, lm_head) 0, as its planner (checked against mergekit's output in tests)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


def count_layers(config: dict[str, Any], names: list[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    idx = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    return max(idx) + 1 if idx else 1


@dataclass
class TensorPlan:
    """One output tensor: its name, shape and dtype, the method (with resolved parameters) and its inputs."""

    name: str  # output tensor name
    shape: tuple[int, ...]
    out_dtype: str
    spec: MethodSpec | None  # None: copy sources[0] unchanged (non-float tensors)
    params: dict[str, Any]
    tensor_params: list[dict[str, Any]]
    base_index: int | None
    sources: list[tuple[ModelSource, str]] = field(default_factory=list)  # (input model, input tensor name)


def _check_same_tensors(ref: ModelSource, others: list[ModelSource], vocab_aligned: bool) -> None:
    """`models:` form: every model has the same tensor names, shapes and float-ness as the reference."""
    for f in others:
        if f is ref:
            continue
        for n in ref.names():
            if n not in f:
                raise TunekitError(f"tensor '{n}' is in model '{ref.label}' but missing from model '{f.label}'")
        for n in f.names():
            if n not in ref:
                raise TunekitError(f"tensor '{n}' is in model '{f.label}' but missing from model '{ref.label}'")
        for n in ref.names():
            _check_pair(ref, n, f, n, vocab_aligned)


def _check_pair(a: ModelSource, an: str, b: ModelSource, bn: str, vocab_aligned: bool = False) -> None:
    """Same shape (vocabulary tensors may differ in rows when a tokenizer merge aligns them) and float-ness."""
    ia, ib = a.info(an), b.info(bn)
    if vocab_aligned and _EMBED_RE.search(an) and ia.shape[1:] == ib.shape[1:]:
        pass
    elif ia.shape != ib.shape:
        hint = " (different vocabularies: use tokenizer_source: union or a tokenizer: block)" if _EMBED_RE.search(
            an
        ) else ""
        where = f"tensor '{an}'" if an == bn else f"tensors '{an}' / '{bn}'"
        raise TunekitError(
            f"{where}: shape {list(ia.shape)} in model '{a.label}' but {list(ib.shape)} in model '{b.label}'{hint}"
        )
    if ia.is_float != ib.is_float:
        raise TunekitError(f"tensor '{an}': dtype {ia.dtype} in '{a.label}' but {ib.dtype} in '{b.label}'")


def _layer_name(name: str, index: int) -> str:
    """`model.layers.7.mlp.up_proj.weight` with its layer number replaced by `index`."""
    m = _LAYER_RE.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def split_layers(src: ModelSource) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """A model's tensors as mergekit's architecture sees them: pre-layer (input embeddings), per layer, post."""
    pre, post, layers = [], [], {}
    for n in src.names():
        m = _LAYER_RE.search(n)
        if m:
            layers.setdefault(int(m.group(1)), []).append(n)
        elif _INPUT_EMBED_RE.search(n):
            pre.append(n)
        else:
            post.append(n)
    return pre, layers, post


@dataclass
class _Group:
    """One output tensor before parameters: its name, t, and per input (source, tensor name)."""

    name: str
    t: float
    inputs: list[tuple[ModelSource, str]]
    out_slice: OutputSlice
    models: list[str]


def _slice_groups(cfg: MergeConfig, sources: dict[str, ModelSource]) -> tuple[list[_Group], list[tuple[str, int]]]:
    """Output tensors of a `slices:` config in mergekit's order: the first slice's pre-layer tensors, each slice's
    layers (renamed to their output index; t = offset/(n−1) within the slice, 1 for a one-layer slice), then the
    last slice's post-layer tensors (t = 0 for both, as mergekit 0.1.5). Also returns (model, input layer) of
    every output layer, for per-layer config lists."""
    slices = cfg.output_slices()
    groups: list[_Group] = []
    origin: list[tuple[str, int]] = []
    structure = {name: split_layers(src) for name, src in sources.items()}
    counts = {name: count_layers(read_model_config(src.path), src.names()) for name, src in sources.items()}

    def ref_of(sl: OutputSlice) -> str:
        base = sl.base_model or cfg.base_model
        models = [s.model for s in sl.sources]
        return base if base in models else models[0]

    def non_layer(sl: OutputSlice, which: int) -> None:
        ref = ref_of(sl)
        models = [s.model for s in sl.sources]
        for n in structure[ref][which]:
            for m in models:
                if n not in sources[m]:
                    raise TunekitError(f"tensor '{n}' is in model '{ref}' but missing from model '{m}'")
                _check_pair(sources[ref], n, sources[m], n, cfg.tokenizer_plan() is not None)
            groups.append(_Group(n, 0.0, [(sources[m], n) for m in models], sl, models))

    non_layer(slices[0], 0)
    out_layer = 0
    # every output layer must have the shapes of the first one: a model is one width (a passthrough of models with
    # different hidden or MLP sizes writes a model nothing can load)
    layer_shapes: dict[str, tuple[tuple[int, ...], str, int]] = {}
    for si, sl in enumerate(slices):
        models = [s.model for s in sl.sources]
        for src in sl.sources:
            assert src.layer_range is not None
            lo, hi = src.layer_range
            if hi > counts[src.model]:
                raise TunekitError(
                    f"{cfg.source}: slices[{si}]: layer_range [{lo}, {hi}] is past the end of model '{src.model}' "
                    f"({counts[src.model]} layers)"
                )
        ref = ref_of(sl)
        ref_src = next(s for s in sl.sources if s.model == ref)
        n_layers = ref_src.layer_range[1] - ref_src.layer_range[0]
        for off in range(n_layers):
            t = off / (n_layers - 1) if n_layers > 1 else 1.0
            ref_layer = ref_src.layer_range[0] + off
            template = structure[ref][1].get(ref_layer, [])
            if not template:
                raise TunekitError(f"model '{ref}' has no tensors for layer {ref_layer}")
            for n in template:
                inputs = []
                for s in sl.sources:
                    in_name = _layer_name(n, s.layer_range[0] + off)
                    if in_name not in sources[s.model]:
                        raise TunekitError(
                            f"tensor '{in_name}' (layer {s.layer_range[0] + off} of slices[{si}]) is missing from "
                            f"model '{s.model}'"
                        )
                    _check_pair(sources[ref], n, sources[s.model], in_name)
                    inputs.append((sources[s.model], in_name))
                key, shape = _layer_name(n, 0), tuple(sources[ref].info(n).shape)
                first = layer_shapes.setdefault(key, (shape, ref, si))
                if first[0] != shape:
                    raise TunekitError(
                        f"{cfg.source}: slices[{si}]: tensor '{n}' of model '{ref}' has shape {list(shape)}, but "
                        f"slices[{first[2]}] (model '{first[1]}') gives it {list(first[0])}: the slices come from "
                        "models of different sizes (hidden or MLP width), which cannot be stacked into one model"
                    )
                groups.append(_Group(_layer_name(n, out_layer), t, inputs, sl, models))
            origin.append((ref, ref_layer))
            out_layer += 1
    non_layer(slices[-1], 2)
    return groups, origin


def _model_groups(cfg: MergeConfig, sources: dict[str, ModelSource]) -> list[_Group]:
    """Output tensors of a `models:` config: every tensor of the base (or first) model, same names."""
    (sl,) = cfg.output_slices()
    models = [s.model for s in sl.sources]
    ref = sources[cfg.base_model if cfg.base_model else models[0]]
    _check_same_tensors(ref, [sources[m] for m in models], cfg.tokenizer_plan() is not None)
    num_layers = count_layers(read_model_config(ref.path), ref.names())
    return [
        _Group(n, layer_fraction(n, num_layers), [(sources[m], n) for m in models], sl, models) for n in ref.names()
    ]


def plan_merge(
    cfg: MergeConfig, sources: dict[str, ModelSource], dtype: str | None
) -> tuple[list[TensorPlan], list[tuple[str, int]] | None]:
    """Check names/shapes across inputs and resolve every parameter for every output tensor (raises before any
    write). Returns the plans and, for `slices:`, the (model, input layer) behind each output layer."""
    if cfg.slices:
        groups, origin = _slice_groups(cfg, sources)
    else:
        groups, origin = _model_groups(cfg, sources), None
    out_dtype = (
        normalize_dtype(dtype, "--dtype") or normalize_dtype(cfg.out_dtype) or normalize_dtype(cfg.dtype)
    )
    spec = METHODS[cfg.merge_method]
    plans = []
    for g in groups:
        first_src, first_name = g.inputs[0]
        info: TensorInfo = first_src.info(first_name)
        base = g.out_slice.base_model or cfg.base_model
        base_index = g.models.index(base) if base in g.models else None
        if not info.is_float:
            ref = g.inputs[base_index] if base_index is not None else g.inputs[0]
            plans.append(TensorPlan(g.name, info.shape, info.dtype, None, {}, [], None, [ref]))
            continue
        n, t = g.name, g.t
        this_spec = spec
        gdefs: dict[str, Any] = dict(spec.global_params)
        tdefs: dict[str, Any] = dict(spec.tensor_params)
        params = {k: cfg.parameter(k, None, n, t, default=d, out_slice=g.out_slice) for k, d in gdefs.items()}
        tparams = []
        for i, m in enumerate(g.models):
            if this_spec.base_is_special and i == base_index and not this_spec.base_tensor_params:
                tparams.append({})
                continue
            tparams.append({k: cfg.parameter(k, m, n, t, default=d, out_slice=g.out_slice) for k, d in tdefs.items()})
        _check_values(cfg, n, this_spec, params, tparams)
        plans.append(
            TensorPlan(
                n,
                info.shape,
                out_dtype or info.dtype,
                this_spec,
                params,
                tparams,
                base_index,
                g.inputs,
            )
        )
    return plans, origin


def _check_values(
    cfg: MergeConfig, tensor: str, spec: MethodSpec, params: dict[str, Any], tparams: list[dict[str, Any]]
) -> None:
    """Types follow the method's defaults (bool flags, numbers; REQUIRED ones are numbers), ranges as mergekit."""
    where = f"{cfg.source}: tensor '{tensor}'"
    defaults = {**spec.global_params, "embed_slerp": False}
    for key, value in params.items():
        default = defaults.get(key, REQUIRED)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TunekitError(f"{where}: parameter '{key}' must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TunekitError(f"{where}: parameter '{key}' must be a number, got {value!r}")
    for key, value in params.items():
        if not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isfinite(value):
            raise TunekitError(f"{where}: parameter '{key}' must be a finite number, got {value!r}")
    if "t" in params and not 0 <= params["t"] <= 1:
        raise TunekitError(f"{where}: t={params['t']} is outside [0, 1]")
    if "max_iter" in params and (params["max_iter"] < 0 or params["max_iter"] != int(params["max_iter"])):
        raise TunekitError(f"{where}: max_iter={params['max_iter']} must be a non-negative integer")
    if "select_topk" in params and not 0 <= params["select_topk"] <= 1:
        raise TunekitError(f"{where}: select_topk={params['select_topk']} is outside [0, 1]")
    for tp in tparams:
        for key, value in tp.items():
            if value is None and key == "scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TunekitError(f"{where}: parameter '{key}' must be a number, got {value!r}")
            if not math.isfinite(value):
                raise TunekitError(f"{where}: parameter '{key}' must be a finite number, got {value!r}")
            if key in ("density", "gamma") and not 0 <= value <= 1:
                raise TunekitError(f"{where}: {key}={value} is outside [0, 1]")
        if "epsilon" in tp and 0 < tp["density"] < 1:
            d, e = tp["density"], tp["epsilon"]
            if not (0 < d - e and d + e < 1):
                raise TunekitError(
                    f"{where}: della needs density ± epsilon inside (0, 1), got density={d}, epsilon={e}"
                )
