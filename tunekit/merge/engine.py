"""The streaming merge engine: validate everything, then merge tensor by tensor (row chunk by row chunk)
to disk.

Peak memory is a few float32 chunks (see `methods.CHUNK_ELEMS`) plus, for TIES, one whole tensor per model; it
does not grow with the model. Nothing is written until every input, name, shape and parameter has been
checked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.merge.config import ADAPTER_SUM, MergeConfig, load_config
from tunekit.merge.io import SafetensorsFolder, ShardedWriter, TensorInfo, normalize_dtype, parse_size
from tunekit.merge.methods import METHODS, REQUIRED, MethodSpec, TensorInputs, slerp

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
    """A local model folder, or a name tunekit knows (alias) via `tunekit.models.load.resolve_model_path`."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from tunekit.models.load import resolve_model_path
    except ImportError:
        resolve_model_path = None
    if resolve_model_path is not None:
        try:
            resolved = Path(resolve_model_path(str(name)))
        except TunekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to resolve is a user-facing "not found"
            raise TunekitError(f"model '{name}' not found ({exc})") from None
        if resolved.is_dir():
            return resolved
    if "+" in str(name):
        raise TunekitError(
            f"model '{name}': 'model+lora' references are not supported; merge the adapter first "
            "with `tunekit merge --base BASE --adapter ADAPTER -o OUT`"
        )
    raise TunekitError(f"model '{name}' not found (a local folder is needed; nothing is downloaded)")


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
    """mergekit's gradient position: layer i of L -> i/(L-1); input embeddings 0; other non-layer tensors
    1."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0 if _INPUT_EMBED_RE.search(name) else 1.0


def count_layers(config: dict[str, Any], names: list[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    idx = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    return max(idx) + 1 if idx else 1


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    spec: MethodSpec | None  # None: copy from the reference model unchanged (non-float tensors)
    params: dict[str, Any]
    tensor_params: list[dict[str, Any]]
    base_index: int | None


def _embed_spec() -> MethodSpec:
    """mergekit's embedding merge under `tokenizer_source` (identical vocabularies): Σw_i·E_i/Σw_i, or
    slerp."""

    def merge(inputs: TensorInputs, params: dict, tparams: list[dict], seed: int):
        if params["embed_slerp"]:
            ia = inputs.base_index or 0
            yield slerp(inputs.read(ia), inputs.read(1 - ia), float(params["t"]))
            return
        yield from METHODS["linear"].merge(inputs, {"normalize": True}, tparams, seed)

    return MethodSpec("embed", {}, {}, merge)


def plan_merge(cfg: MergeConfig, folders: list[SafetensorsFolder], dtype: str | None) -> list[TensorPlan]:
    """Check names/shapes across inputs and resolve every parameter for every tensor (raises before any
    write)."""
    names = cfg.model_names()
    base_index = names.index(cfg.base_model) if cfg.base_model else None
    ref = folders[base_index if base_index is not None else 0]
    for f in folders:
        if f is ref:
            continue
        for n in ref.names():
            if n not in f:
                raise TunekitError(
                    f"tensor '{n}' is in model '{ref.label}' but missing from model '{f.label}'"
                )
        for n in f.names():
            if n not in ref:
                raise TunekitError(
                    f"tensor '{n}' is in model '{f.label}' but missing from model '{ref.label}'"
                )
        for n in ref.names():
            a, b = ref.info(n), f.info(n)
            if a.shape != b.shape:
                hint = (
                    " (different vocabularies: merging them is not supported)" if _EMBED_RE.search(n) else ""
                )
                raise TunekitError(
                    f"tensor '{n}': shape {list(a.shape)} in model '{ref.label}' but {list(b.shape)} in "
                    f"model '{f.label}'{hint}"
                )
            if a.is_float != b.is_float:
                raise TunekitError(
                    f"tensor '{n}': dtype {a.dtype} in '{ref.label}' but {b.dtype} in '{f.label}'"
                )
    out_dtype = (
        normalize_dtype(dtype, "--dtype") or normalize_dtype(cfg.out_dtype) or normalize_dtype(cfg.dtype)
    )
    num_layers = count_layers(read_model_config(ref.path), ref.names())
    spec = METHODS[cfg.merge_method]
    plans = []
    for n in ref.names():
        info: TensorInfo = ref.info(n)
        if not info.is_float:
            plans.append(TensorPlan(n, info.shape, info.dtype, None, {}, [], None))
            continue
        t = layer_fraction(n, num_layers)
        this_spec = spec
        gdefs: dict[str, Any] = dict(spec.global_params)
        tdefs: dict[str, Any] = dict(spec.tensor_params)
        if cfg.tokenizer_source and _EMBED_RE.search(n):
            this_spec = _embed_spec()
            embed_slerp = cfg.parameter("embed_slerp", None, n, t, default=False)
            gdefs = {"embed_slerp": False, "t": REQUIRED} if embed_slerp else {"embed_slerp": False}
            if not embed_slerp:
                tdefs = {"weight": REQUIRED}
                for m in names:
                    if cfg.parameter("weight", m, n, t, default=None) is None:
                        raise TunekitError(
                            f"{cfg.source}: with tokenizer_source, '{n}' is merged linearly by 'weight' (as "
                            f"mergekit does): give model '{m}' a weight, or set embed_slerp: true"
                        )
            else:
                tdefs = {}
        params = {k: cfg.parameter(k, None, n, t, default=d) for k, d in gdefs.items()}
        tparams = []
        for i, m in enumerate(names):
            if this_spec.needs_base and i == base_index and not this_spec.base_tensor_params:
                tparams.append({})
                continue
            tparams.append({k: cfg.parameter(k, m, n, t, default=d) for k, d in tdefs.items()})
        _check_values(cfg, n, params, tparams)
        plans.append(
            TensorPlan(n, info.shape, out_dtype or info.dtype, this_spec, params, tparams, base_index)
        )
    return plans


def _check_values(
    cfg: MergeConfig, tensor: str, params: dict[str, Any], tparams: list[dict[str, Any]]
) -> None:
    where = f"{cfg.source}: tensor '{tensor}'"
    for key in ("normalize", "rescale", "int8_mask", "embed_slerp"):
        if key in params and not isinstance(params[key], bool):
            raise TunekitError(f"{where}: parameter '{key}' must be true or false, got {params[key]!r}")
    for key in ("t", "lambda"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], (int, float))):
            raise TunekitError(f"{where}: parameter '{key}' must be a number, got {params[key]!r}")
    if "t" in params and not 0 <= params["t"] <= 1:
        raise TunekitError(f"{where}: t={params['t']} is outside [0, 1]")
    for key in ("t", "lambda"):
        if key in params and not math.isfinite(params[key]):
            raise TunekitError(f"{where}: parameter '{key}' must be a finite number, got {params[key]!r}")
    for tp in tparams:
        for key, value in tp.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TunekitError(f"{where}: parameter '{key}' must be a number, got {value!r}")
            if not math.isfinite(value):
                raise TunekitError(f"{where}: parameter '{key}' must be a finite number, got {value!r}")
            if key == "density" and not 0 <= value <= 1:
                raise TunekitError(f"{where}: density={value} is outside [0, 1]")


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
    paths = [resolve_model(n) for n in names]
    for n, p in zip(names, paths, strict=True):
        check_not_quantized(p, n)
    folders = [SafetensorsFolder(p, label=n) for n, p in zip(names, paths, strict=True)]
    plans = plan_merge(cfg, folders, dtype)

    ref_index = names.index(cfg.base_model) if cfg.base_model else 0
    tok_name = cfg.tokenizer_source if cfg.tokenizer_source not in (None, "base") else names[ref_index]
    tok_path = paths[names.index(tok_name)]
    out_dtypes = {p.out_dtype for p in plans if p.spec is not None}
    writer_plan = [(p.name, p.shape, p.out_dtype) for p in plans]
    torch_dtypes = {d: getattr(torch, d) for d in {p.out_dtype for p in plans}}

    with atomic_output(output, overwrite) as tmp:
        writer = ShardedWriter(tmp, writer_plan, max_shard, metadata={"tunekit": f"merge:{cfg.merge_method}"})
        bar, task = byte_progress(writer.total_size, progress)
        with bar:
            for plan in plans:
                if plan.spec is None:
                    chunk = folders[ref_index].read(plan.name)
                    writer.write(plan.name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
                    continue
                readers = [(lambda rows, f=f, n=plan.name: f.read(n, rows, torch.float32)) for f in folders]
                inputs = TensorInputs(plan.name, plan.shape, readers, plan.base_index)
                for chunk in plan.spec.merge(inputs, plan.params, plan.tensor_params, seed):
                    chunk = chunk.to(torch_dtypes[plan.out_dtype])
                    writer.write(plan.name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
                    del chunk
        writer.close()
        _copy_support_files(
            paths[ref_index], tok_path, tmp, out_dtypes.pop() if len(out_dtypes) == 1 else None
        )
        yaml_text = yaml.safe_dump(cfg.to_mergekit_dict(), sort_keys=False)
        write_model_card(tmp, f"Merge of {', '.join(names)}", cfg.merge_method, yaml_text)
        (tmp / "mergekit_config.yml").write_text(yaml_text)
    log(f"merged {len(names)} models with {cfg.merge_method} -> {output}")
    return output


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
        for i in range(len(models)):
            model_params[i]["weight"] = weights[i] if weights is not None else 1.0
            if density is not None:
                model_params[i]["density"] = density
        if method in METHODS and METHODS[method].needs_base:
            if not base:
                raise TunekitError(f"--method {method} needs --base (task vectors are relative to it)")
            raw["base_model"] = base
        elif base:
            raise TunekitError(f"--base is not used by '{method}'")
    if density is not None and method not in ("ties", "dare_ties", "dare_linear"):
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
