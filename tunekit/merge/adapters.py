"""Fold adapters into their base model (streaming), and sum same-shaped summable adapters into one adapter.

Adapter kinds live in a registry (`register_adapter_type`) so other tunekit modules can add theirs (LoRA-XS,
SVFT, PiSSA/MiLoRA, ...) with their own detection, merge and "summable tensors" rules. Built in: PEFT
LoRA, with
rsLoRA, DoRA, rank/alpha patterns, embedding LoRA and modules_to_save.

LoRA merge math (Hu et al. 2021; as PEFT's `merge_and_unload`): W' = W + s·B·A with s = α/r (rsLoRA: α/√r,
Kalajdzievski 2023). DoRA (Liu et al. 2024): W' = m ⊙ (W + s·B·A) / ||W + s·B·A||_row, the L2 norm of each
output row of the (out × in) weight as PEFT computes it (`DoraLinearLayer.get_weight_norm`, dim=1).
These are computed here per base tensor so that only one base tensor is in memory at a time; the result is
checked against PEFT's `merge_and_unload` in tests.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.merge.io import SafetensorsFolder, ShardedWriter, normalize_dtype, parse_size

Log = Callable[[str], None]
#: base tensor name -> function mapping the float32 base tensor W to the merged W'.
TensorEdits = dict[str, Callable[[Any], Any]]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FOUR_BIT_NOTE = (
    "note: the run trained on a 4-bit quantized base; merging into the 16-bit base weights on disk instead "
    "(merging into 4-bit weights changes generations, a known PEFT issue)"
)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class AdapterType:
    """A kind of adapter tunekit can merge.

    detect(folder) -> bool: is `folder` an adapter of this kind.
    plan_merge(folder, base) -> TensorEdits: per base tensor, how to compute the merged weight (None:
    can't merge).
    summable(tensor_name) -> bool: which adapter tensors are trainable and are summed by `sum_adapters`; None
      means the kind cannot be summed, and `sum_refusal` says why.
    weights_file: the adapter's tensor file inside its folder.
    ignore_config_keys: config keys that may differ between adapters being summed.
    finalize(folder): called on a freshly summed adapter folder before it is renamed into place, to rebuild
      derived files (e.g. LoRA-XS's plain-LoRA export, which a sum makes stale).
    """

    name: str
    detect: Callable[[Path], bool]
    plan_merge: Callable[[Path, SafetensorsFolder], TensorEdits] | None = None
    summable: Callable[[str], bool] | None = None
    sum_refusal: str = "this adapter type does not support adapter_sum"
    config_file: str = ADAPTER_CONFIG
    weights_file: str = ADAPTER_WEIGHTS
    ignore_config_keys: tuple[str, ...] = ("inference_mode", "peft_version", "revision")
    finalize: Callable[[Path], Any] | None = None


_ADAPTER_TYPES: list[AdapterType] = []


def register_adapter_type(kind: AdapterType) -> None:
    """Register (or replace, by name) an adapter kind. Later registrations are detected first."""
    _ADAPTER_TYPES[:] = [k for k in _ADAPTER_TYPES if k.name != kind.name]
    _ADAPTER_TYPES.append(kind)


def adapter_types() -> list[AdapterType]:
    return list(_ADAPTER_TYPES)


_EXTERNAL_LOADED = False


def _load_external_types() -> None:
    """Import tunekit's adapter kinds that register themselves here (tunekit.adapters.extra), once."""
    global _EXTERNAL_LOADED
    if _EXTERNAL_LOADED:
        return
    _EXTERNAL_LOADED = True
    import importlib

    try:
        importlib.import_module("tunekit.adapters.extra")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tunekit.adapters.extra", "tunekit.adapters"):
            raise


def detect_adapter_type(folder: Path) -> AdapterType:
    _load_external_types()
    for kind in reversed(_ADAPTER_TYPES):
        if kind.detect(folder):
            return kind
    cfg = _read_json(folder / ADAPTER_CONFIG) if (folder / ADAPTER_CONFIG).is_file() else {}
    what = f"peft_type '{cfg['peft_type']}'" if cfg.get("peft_type") else "no known adapter files"
    known = ", ".join(k.name for k in _ADAPTER_TYPES)
    raise TunekitError(f"adapter '{folder}': {what}; tunekit can merge: {known}")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TunekitError(f"{file}: cannot read JSON ({exc})") from None


def _load_tensors(file: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise TunekitError(f"adapter weights '{file}' not found")
    return load_file(str(file))


# ------------------------------------------------------------------------------------------------ PEFT LoRA


def _is_peft_lora(folder: Path) -> bool:
    file = folder / ADAPTER_CONFIG
    return file.is_file() and str(_read_json(file).get("peft_type", "")).upper() == "LORA"


_UNSUPPORTED_LORA = {
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "lora_bias",
}


def _lora_plan(folder: Path, base: SafetensorsFolder) -> TensorEdits:
    """Per base tensor W: W + s·ΔW (LoRA), the DoRA renormalisation, or a replacement (modules_to_save)."""
    import torch
    from peft.utils.other import get_pattern_key

    cfg = _read_json(folder / ADAPTER_CONFIG)
    where = f"adapter '{folder}'"
    for key, what in _UNSUPPORTED_LORA.items():
        if cfg.get(key):
            raise TunekitError(
                f"{where}: {what} is not supported by tunekit merge ({ADAPTER_CONFIG}: '{key}')"
            )
    if cfg.get("bias", "none") != "none":
        raise TunekitError(f"{where}: bias='{cfg['bias']}' is not supported (only bias='none')")
    tensors = _load_tensors(folder / ADAPTER_WEIGHTS)
    modules: dict[str, dict[str, Any]] = {}
    replace: dict[str, Any] = {}
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "eA",
        ".lora_embedding_B": "eB",
        ".lora_magnitude_vector": "m",
        ".lora_magnitude_vector.weight": "m",
    }
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suf, part in suffixes.items():
            if name.endswith(suf):
                modules.setdefault(name[: -len(suf)], {})[part] = value
                break
        else:  # a full tensor (modules_to_save, saved embedding layers): replaces the base tensor
            replace[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = value
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    edits: TensorEdits = {}
    for tname, value in replace.items():
        if tname not in base:
            raise TunekitError(f"{where}: tensor '{tname}' has no counterpart in the base model")
        if tuple(value.shape) != base.info(tname).shape:
            raise TunekitError(
                f"{where}: tensor '{tname}' shape {list(value.shape)} does not match the base "
                f"{list(base.info(tname).shape)} (resized vocabulary?)"
            )
        edits[tname] = lambda w, v=value: v.to(torch.float32)
    for mod, parts in modules.items():
        wname = f"{mod}.weight"
        if wname not in base:
            hint = " (tied embeddings?)" if mod.endswith("lm_head") else ""
            raise TunekitError(f"{where}: module '{mod}' has no weight '{wname}' in the base model{hint}")
        embedding = "eA" in parts
        a, b = (parts.get("eA"), parts.get("eB")) if embedding else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            raise TunekitError(f"{where}: module '{mod}' lacks its lora_A or lora_B tensor")
        if a.dim() != 2:
            raise TunekitError(f"{where}: module '{mod}': LoRA on convolutions is not supported")
        r = int(_pattern_value(rank_pattern, mod, cfg["r"], get_pattern_key))
        alpha = float(_pattern_value(alpha_pattern, mod, cfg["lora_alpha"], get_pattern_key))
        if r != a.shape[0]:
            raise TunekitError(f"{where}: module '{mod}': lora_A has rank {a.shape[0]}, config says r={r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        magnitude = parts.get("m")
        if magnitude is not None and embedding:
            raise TunekitError(f"{where}: module '{mod}': DoRA on embeddings is not supported")
        edits[wname] = _lora_edit(a, b, scale, embedding, fan_in_fan_out, magnitude, edits.get(wname))
    return edits


def _pattern_value(pattern: dict[str, Any], module: str, default: Any, get_pattern_key: Callable) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (`peft.utils.other.get_pattern_key`), else the default."""
    if not pattern:
        return default
    key = get_pattern_key(list(pattern), module)
    return pattern.get(key, default)


def _lora_edit(
    a: Any,
    b: Any,
    scale: float,
    embedding: bool,
    fan_in_fan_out: bool,
    magnitude: Any,
    previous: Callable[[Any], Any] | None,
) -> Callable[[Any], Any]:
    import torch

    def edit(w: Any) -> Any:
        if previous is not None:
            w = previous(w)
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale  # out x in (embedding: dim x vocab)
        if embedding or fan_in_fan_out:
            w = w.T
        merged = w + delta
        if magnitude is not None:
            norm = torch.linalg.norm(merged, dim=1)
            merged = merged * (magnitude.to(torch.float32) / norm).view(-1, 1)
        return merged.T.contiguous() if (embedding or fan_in_fan_out) else merged

    return edit


_LORA_SUM_REFUSAL = (
    "plain LoRA adapters cannot be summed into one adapter of the same size: "
    "(B1+B2)(A1+A2) != B1·A1 + B2·A2, "
    "so the result would not be the sum of the updates; fold each into the base with "
    "`tunekit merge --base BASE --adapter A -o OUT` and merge the models (e.g. task_arithmetic), or use a "
    "summable adapter type"
)

register_adapter_type(AdapterType("lora", _is_peft_lora, _lora_plan, None, _LORA_SUM_REFUSAL))


# ------------------------------------------------------------------------------------------------ resolving


@dataclass
class ResolvedAdapter:
    folder: Path
    kind: AdapterType
    base_hint: str | None  # base model named by the run's recipe or the adapter config
    load_in_4bit: bool


def resolve_adapter(path: str | Path) -> ResolvedAdapter:
    """A PEFT/tunekit adapter folder, or a tunekit run directory (RUN/recipe.yaml + RUN/adapter/)."""
    from tunekit.run.locate import locate

    path = Path(path).expanduser()
    if not path.is_dir():
        raise TunekitError(f"adapter '{path}' not found")
    loc = locate(path)
    if loc is None or loc.adapter_dir is None:
        if loc is not None and loc.kind == "run":
            raise TunekitError(f"run '{path}' is a full fine-tune: {loc.model_dir} is already a merged model")
        raise TunekitError(f"'{path}' is a model folder, not an adapter or a run with an adapter")
    kind = detect_adapter_type(loc.adapter_dir)
    base = loc.base
    return ResolvedAdapter(loc.adapter_dir, kind, base.name if base else None, bool(base and base.load_in_4bit))


# ------------------------------------------------------------------------------------------------ merge


def merge_adapter(
    base: str | Path | None,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = True,
    log: Log = _stderr,
) -> Path:
    """Fold `adapter` (adapter folder or tunekit run dir) into `base` and write a full model folder to
    `output`.

    `base` None: the run's recipe `model.name`, else the adapter config's `base_model_name_or_path`.
    Streams the
    base tensor by tensor; tensors the adapter does not touch are copied (cast to `dtype` if given).
    """
    import torch

    from tunekit.merge.engine import (
        _copy_support_files,
        byte_progress,
        check_not_quantized,
        resolve_model,
        write_model_card,
    )
    from tunekit.run.atomic import atomic_output, check_output

    output = check_output(output, overwrite)
    max_shard = parse_size(shard_size)
    out_dtype = normalize_dtype(dtype, "--dtype")
    res = resolve_adapter(adapter)
    if res.kind.plan_merge is None:
        raise TunekitError(
            f"adapter '{res.folder}': type '{res.kind.name}' cannot be merged into a base model"
        )
    base_name = base if base is not None else res.base_hint
    if base_name is None:
        raise TunekitError(f"adapter '{res.folder}': no base model recorded; pass --base")
    base_path = resolve_model(base_name)
    check_not_quantized(base_path, str(base_name))
    if res.load_in_4bit:
        log(FOUR_BIT_NOTE)
    folder = SafetensorsFolder(base_path, label=str(base_name))
    edits = res.kind.plan_merge(res.folder, folder)
    plan = [(n, folder.info(n).shape, out_dtype or folder.info(n).dtype) for n in folder.names()]
    plan = [(n, s, d if folder.info(n).is_float else folder.info(n).dtype) for n, s, d in plan]
    with atomic_output(output, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard, metadata={"tunekit": f"merge:adapter:{res.kind.name}"})
        bar, task = byte_progress(writer.total_size, progress, "merging adapter")
        with bar:
            for name, shape, dt in plan:
                if name in edits:
                    chunks = [edits[name](folder.read(name, dtype=torch.float32))]
                else:
                    from tunekit.merge.methods import TensorInputs

                    rows_list = TensorInputs(name, shape, [], None).chunks()
                    chunks = (folder.read(name, rows) for rows in rows_list)
                for chunk in chunks:
                    chunk = chunk.to(getattr(torch, dt))
                    writer.write(name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
        writer.close()
        _copy_support_files(base_path, base_path, tmp, out_dtype)
        copied_tok = [p.name for p in res.folder.glob("tokenizer*") if p.is_file()]
        for name in copied_tok:
            shutil.copy2(res.folder / name, tmp / name)
        notes = [f"base: `{base_name}`", f"adapter: `{adapter}` ({res.kind.name})"]
        if res.load_in_4bit:
            notes.append("trained on a 4-bit base; merged into the 16-bit base weights")
        config_text = (
            (res.folder / res.kind.config_file).read_text()
            if (res.folder / res.kind.config_file).is_file()
            else ""
        )
        write_model_card(
            tmp,
            f"{Path(str(base_name)).name} + {Path(str(adapter)).name}",
            "adapter merge",
            config_text,
            notes,
        )
    log(f"merged adapter {adapter} into {base_name} -> {output}")
    return output


# ------------------------------------------------------------------------------------------------ adapter_sum


def sum_adapters(
    adapters: Sequence[str | Path],
    weights: Sequence[float],
    output: str | Path,
    *,
    overwrite: bool = False,
    log: Log = _stderr,
) -> Path:
    """adapter_sum: one adapter whose trainable tensors are Σ_i w_i·T_i over N adapters of one summable type.

    The adapters must share type, config (same base fingerprint, ranks, targets) and every frozen tensor
    bit for
    bit; otherwise the sum is meaningless and this raises. Exact for types whose update is linear in the
    trainable tensors with shared frozen factors (LoRA-XS's R, SVFT's M); refused for plain LoRA.
    """
    import torch
    from safetensors.torch import save_file

    from tunekit.run.atomic import atomic_output, check_output

    output = check_output(output, overwrite)
    if len(adapters) < 2:
        raise TunekitError("adapter_sum needs at least two adapters")
    if len(weights) != len(adapters):
        raise TunekitError(f"adapter_sum: {len(adapters)} adapters but {len(weights)} weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TunekitError(f"adapter_sum: weight {w!r} is not a number")
    resolved = [resolve_adapter(a) for a in adapters]
    kind = resolved[0].kind
    for a, r in zip(adapters, resolved, strict=True):
        if r.kind.name != kind.name:
            raise TunekitError(
                f"adapter_sum: '{a}' is a {r.kind.name} adapter but '{adapters[0]}' is {kind.name}"
            )
    if kind.summable is None:
        raise TunekitError(f"adapter_sum: {kind.sum_refusal}")
    configs = []
    for r in resolved:
        file = r.folder / kind.config_file
        cfg = _read_json(file) if file.is_file() else {}
        configs.append({k: v for k, v in cfg.items() if k not in kind.ignore_config_keys})
    for a, cfg in zip(adapters[1:], configs[1:], strict=True):
        for key in sorted(set(cfg) | set(configs[0])):
            if cfg.get(key) != configs[0].get(key):
                raise TunekitError(
                    f"adapter_sum: '{a}' and '{adapters[0]}' differ in config key '{key}' "
                    f"({cfg.get(key)!r} vs {configs[0].get(key)!r}); only identically configured "
                    "adapters of the same base can be summed"
                )
    tensors = [_load_tensors(r.folder / kind.weights_file) for r in resolved]
    out: dict[str, Any] = {}
    for name, first in tensors[0].items():
        for a, t in zip(adapters[1:], tensors[1:], strict=True):
            if name not in t or t[name].shape != first.shape:
                raise TunekitError(f"adapter_sum: tensor '{name}' is missing or has another shape in '{a}'")
        if kind.summable(name):
            acc = torch.zeros(first.shape, dtype=torch.float32)
            for w, t in zip(weights, tensors, strict=True):
                acc.add_(t[name].to(torch.float32), alpha=float(w))
            out[name] = acc.to(first.dtype)
        else:
            for a, t in zip(adapters[1:], tensors[1:], strict=True):
                if not torch.equal(t[name], first):
                    raise TunekitError(
                        f"adapter_sum: frozen tensor '{name}' differs between '{adapters[0]}' and '{a}' "
                        "(different initialisation or base); they cannot be summed"
                    )
            out[name] = first
    for a, t in zip(adapters[1:], tensors[1:], strict=True):
        extra = set(t) - set(tensors[0])
        if extra:
            raise TunekitError(f"adapter_sum: tensor '{sorted(extra)[0]}' of '{a}' is not in '{adapters[0]}'")
    with atomic_output(output, overwrite) as tmp:
        for p in resolved[0].folder.iterdir():
            if p.is_file() and p.name != kind.weights_file:
                shutil.copy2(p, tmp / p.name)
        save_file(out, str(tmp / kind.weights_file), metadata={"format": "pt"})
        summary = ", ".join(f"{w} x {a}" for w, a in zip(weights, adapters, strict=True))
        (tmp / "README.md").write_text(
            f"# adapter_sum\n\nMade with `tunekit merge` (adapter_sum): {summary}\n"
        )
        if kind.finalize is not None:
            kind.finalize(tmp)
    log(f"summed {len(adapters)} {kind.name} adapters -> {output}")
    return output
