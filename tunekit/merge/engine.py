"""The streaming merge engine: validate everything, then merge tensor by tensor (row chunk by row chunk)
to disk.

Peak memory is a few float32 chunks (see `methods.CHUNK_ELEMS`) plus, for the methods that need a whole tensor (ties,
breadcrumbs, model_stock, nuslerp, karcher, sce), one whole tensor per model; it does not grow with the model.
Nothing is written until every input, name, shape and parameter has been checked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.merge.config import ADAPTER_SUM, MergeConfig, OutputSlice, load_config
from tunekit.merge.io import ShardedWriter, TensorInfo, normalize_dtype, parse_size
from tunekit.merge.methods import METHODS, REQUIRED, MethodSpec, TensorInputs, row_chunks
from tunekit.merge.sources import ModelSource, open_source

DEFAULT_SHARD_SIZE = "5GB"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_INPUT_EMBED_RE = re.compile(r"(embed_tokens|wte|wpe|embed_in|word_embeddings|embeddings)\.weight$")
_EMBED_RE = re.compile(r"(embed_tokens|wte|embed_in|word_embeddings|lm_head|embed_out)\.weight$")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def resolve_model(name: str | Path) -> Path:
    """A local model folder, a tunekit alias or a hub id from the hub cache (see `tunekit.merge.sources`)."""
    from tunekit.merge.sources import resolve_model_path

    if "+" in str(name) and not Path(name).expanduser().exists():
        raise TunekitError(f"model '{name}': a MODEL+ADAPTER reference is not a base model folder")
    return resolve_model_path(str(name))


def read_model_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TunekitError(f"{file}: invalid JSON ({exc})") from None


def check_not_quantized(folder: Path, label: str) -> None:
    cfg = read_model_config(folder)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "quantized")
        raise TunekitError(
            f"model '{label}' is {method}-quantized; merge the unquantized 16/32-bit weights instead"
        )


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


def _copy_support_files(src_config: Path, src_tokenizer: Path, out: Path, out_dtype: str | None) -> None:
    for name in CONFIG_FILES:
        if (src_config / name).is_file():
            shutil.copy2(src_config / name, out / name)
    for name in TOKENIZER_FILES:
        if (src_tokenizer / name).is_file():
            shutil.copy2(src_tokenizer / name, out / name)
    cfg_file = out / "config.json"
    if out_dtype and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg["dtype"] = out_dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = out_dtype
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def write_model_card(
    out: Path, title: str, method: str, config_yaml: str, notes: list[str] | None = None
) -> None:
    lines = [
        "---",
        "tags: [merge, tunekit]",
        "---",
        f"# {title}",
        "",
        f"Made with `tunekit merge` using the **{method}** method.",
        "",
        *(f"- {n}" for n in notes or []),
        "",
        "## Merge configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def byte_progress(total: int, enabled: bool, label: str = "merging"):
    """A rich progress bar over bytes written (on stderr), or a no-op."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
    task = progress.add_task(label, total=total)
    return progress, task


def _copies_values(plan: TensorPlan, vocab: Any) -> bool:
    """Whether the output tensor is its (only) input's values: non-float tensors and passthrough without `scale`.

    Those are copied row chunk by row chunk in their own dtype and cast straight to the output dtype, with no float32
    round trip (the same values: bf16/fp16 -> float32 is exact) and no float32 chunk in memory."""
    if plan.spec is None:
        return True
    return (
        plan.spec.name == "passthrough"
        and plan.tensor_params[0].get("scale") is None
        and not (vocab is not None and vocab.touches(plan))
    )


def merge_models(
    config: MergeConfig | str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Log = _stderr,
) -> Path:
    """Merge the models of a mergekit-style config into `output` (a model folder), streaming tensor by
    tensor."""
    import torch
    import yaml

    from tunekit.run.atomic import atomic_output, check_output

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    max_shard = parse_size(shard_size)
    output = check_output(output, overwrite, inputs=[*cfg.model_names(), cfg.source])
    if cfg.merge_method == ADAPTER_SUM:
        from tunekit.merge.adapters import sum_adapters

        names = cfg.model_names()
        weights = [cfg.parameter("weight", m, "", 0.0) for m in names]
        return sum_adapters(names, weights, output, overwrite=overwrite)

    names = cfg.model_names()
    sources = {n: open_source(n) for n in names}
    for n, src in sources.items():
        check_not_quantized(src.path, n)
    plans, origin = plan_merge(cfg, sources, dtype)
    vocab = None
    if cfg.tokenizer_plan() is not None:
        from tunekit.merge.tokenizer import plan_vocabulary

        vocab = plan_vocabulary(cfg, sources, plans)  # None when every vocabulary already matches the output
        if vocab is not None:
            plans = [vocab.adapt(p) for p in plans]

    donor = sources[cfg.base_model or names[0]]
    out_dtypes = {p.out_dtype for p in plans if p.spec is not None}
    writer_plan = [(p.name, p.shape, p.out_dtype) for p in plans]
    torch_dtypes = {d: getattr(torch, d) for d in {p.out_dtype for p in plans}}

    with atomic_output(output, overwrite) as tmp:
        writer = ShardedWriter(tmp, writer_plan, max_shard, metadata={"tunekit": f"merge:{cfg.merge_method}"})
        bar, task = byte_progress(writer.total_size, progress)
        with bar:
            for plan in plans:
                if _copies_values(plan, vocab):
                    src, name = plan.sources[0]
                    for rows in row_chunks(plan.shape):
                        chunk = src.read(name, rows).to(torch_dtypes[plan.out_dtype])
                        writer.write(plan.name, chunk)
                        bar.advance(task, chunk.numel() * chunk.element_size())
                        del chunk
                    continue
                if vocab is not None and vocab.touches(plan):
                    readers = vocab.readers(plan)
                else:
                    readers = [(lambda rows, f=f, n=n: f.read(n, rows, torch.float32)) for f, n in plan.sources]
                inputs = TensorInputs(plan.name, plan.shape, readers, plan.base_index)
                for chunk in plan.spec.merge(inputs, plan.params, plan.tensor_params, seed):
                    chunk = chunk.to(torch_dtypes[plan.out_dtype])
                    writer.write(plan.name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
                    del chunk
        writer.close()
        block = cfg.tokenizer_plan()
        tok_src = donor.path
        if block is not None and block.source not in ("base", "union"):
            tok_src = sources[block.source].path
        _copy_support_files(donor.path, tok_src, tmp, out_dtypes.pop() if len(out_dtypes) == 1 else None)
        _write_out_config(tmp, origin, vocab.vocab_size if vocab is not None else None)
        if vocab is not None:
            vocab.save_tokenizer(tmp)
        if cfg.chat_template:
            from tunekit.merge.tokenizer import set_chat_template

            set_chat_template(tmp, cfg, sources, log)
        yaml_text = yaml.safe_dump(cfg.to_mergekit_dict(), sort_keys=False)
        write_model_card(tmp, f"Merge of {', '.join(names)}", cfg.merge_method, yaml_text)
        (tmp / "mergekit_config.yml").write_text(yaml_text)
    log(f"merged {len(names)} models with {cfg.merge_method} -> {output}")
    return output


def _write_out_config(out: Path, origin: list[tuple[str, int]] | None, vocab_size: int | None) -> None:
    """config.json of a `slices:` merge gets the new layer count (per-layer lists such as `layer_types` follow the
    layers they came from); a union tokenizer sets `vocab_size`."""
    file = out / "config.json"
    if not file.is_file() or (origin is None and vocab_size is None):
        return
    cfg = json.loads(file.read_text())
    if origin is not None:
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)
        old = cfg.get(key) if key else None
        if key:
            cfg[key] = len(origin)
        for k, v in list(cfg.items()):
            if isinstance(v, list) and old is not None and len(v) == old and k.startswith("layer_"):
                cfg[k] = [v[layer] for _, layer in origin]
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    file.write_text(json.dumps(cfg, indent=2) + "\n")


def short_config(
    method: str,
    models: list[str],
    *,
    base: str | None = None,
    t: float | None = None,
    weights: list[float] | None = None,
    density: float | None = None,
) -> MergeConfig:
    """The mergekit config the CLI short form stands for (e.g. `--method slerp --t 0.5 A B`)."""
    from tunekit.merge.config import validate_config

    if weights is not None and len(weights) != len(models):
        raise TunekitError(f"--weights: {len(weights)} values for {len(models)} models")
    raw: dict[str, Any] = {"merge_method": method}
    params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = [{} for _ in models]
    if method == "slerp":
        if len(models) == 1 and base:
            models = [base, *models]
            model_params.insert(0, {})
        if len(models) != 2:
            raise TunekitError("--method slerp merges exactly two models: A B (A is the t=0 end)")
        if t is None:
            raise TunekitError("--method slerp needs --t")
        raw["base_model"] = base or models[0]
        params["t"] = t
    else:
        if t is not None:
            raise TunekitError(f"--t is only used by slerp, not '{method}'")
        takes = METHODS[method].tensor_params if method in METHODS else {"weight": REQUIRED}
        if weights is not None and "weight" not in takes:
            raise TunekitError(f"--weights is not used by '{method}'")
        for i in range(len(models)):
            if "weight" in takes:
                model_params[i]["weight"] = weights[i] if weights is not None else 1.0
            if density is not None:
                model_params[i]["density"] = density
        if method in METHODS and METHODS[method].needs_base:
            if not base:
                raise TunekitError(f"--method {method} needs --base (task vectors are relative to it)")
            raw["base_model"] = base
        elif base and method in METHODS and METHODS[method].base_is_special:
            raw["base_model"] = base
        elif base:
            raise TunekitError(f"--base is not used by '{method}'")
    if density is not None and (method not in METHODS or "density" not in METHODS[method].tensor_params):
        raise TunekitError(f"--density is not used by '{method}'")
    raw["models"] = [
        {"model": m, **({"parameters": p} if p else {})} for m, p in zip(models, model_params, strict=True)
    ]
    if params:
        raw["parameters"] = params
    return validate_config(raw, source="command line")


def run_merge_command(
    *,
    inputs: list[str],
    output: Path | None,
    method: str | None,
    t: float | None,
    weights: str | None,
    density: float | None,
    base: str | None,
    adapter: str | None,
    overwrite: bool,
    dtype: str | None,
    shard_size: str,
    seed: int,
    progress: bool,
) -> Path:
    """Dispatch the three CLI forms (config, --method short form, --adapter) to the library functions."""
    if adapter is not None:
        if method or t is not None or weights or density is not None:
            raise TunekitError("--adapter takes only --base, -o, --dtype, --shard-size and --overwrite")
        if output is None and len(inputs) == 1:
            output = Path(inputs[0])
        elif inputs:
            raise TunekitError(f"unexpected arguments with --adapter: {' '.join(inputs)}")
        if output is None:
            raise TunekitError("missing output folder: pass -o OUT")
        from tunekit.merge.adapters import merge_adapter

        return merge_adapter(
            base, adapter, output, dtype=dtype, overwrite=overwrite, shard_size=shard_size, progress=progress
        )
    if method is not None:
        if output is None:
            raise TunekitError("missing output folder: pass -o OUT")
        if not inputs:
            raise TunekitError("no models given: tunekit merge --method METHOD A B -o OUT")
        parsed = None
        if weights is not None:
            try:
                parsed = [float(w) for w in weights.split(",")]
            except ValueError:
                raise TunekitError(f"--weights: cannot parse '{weights}' (example: 0.5,0.5)") from None
        cfg = short_config(method, inputs, base=base, t=t, weights=parsed, density=density)
    else:
        if not inputs:
            raise TunekitError("missing CONFIG.yml (or use --method / --adapter); see tunekit merge --help")
        if t is not None or weights or density is not None or base:
            raise TunekitError(
                "--t/--weights/--density/--base need --method (or --adapter); a config has its own"
            )
        if len(inputs) == 2 and output is None:
            output = Path(inputs[1])
        elif len(inputs) != 1:
            raise TunekitError("expected: tunekit merge CONFIG.yml OUTPUT_DIR")
        if output is None:
            raise TunekitError("missing OUTPUT_DIR")
        cfg = load_config(inputs[0])
    return merge_models(
        cfg, output, dtype=dtype, shard_size=shard_size, overwrite=overwrite, seed=seed, progress=progress
    )
