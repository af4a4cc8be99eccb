"""LoRA and DoRA through PEFT: one adapter kind, "lora" (the PEFT LoRA format PiSSA and MiLoRA also save).

LoRA (Hu et al., ICLR 2022): W' = W + (α/r)·B·A, B ∈ R^{d_out×r} zero-initialised, A ∈ R^{r×d_in};
trainable parameters per target module: r·(d_in + d_out). rsLoRA (Kalajdzievski 2023) scales by α/√r.
DoRA (Liu et al., ICML 2024): W' = m · (W + (α/r)BA) / ‖W + (α/r)BA‖_c, adding the magnitude vector m (d_out).
With a 4/8-bit base this is QLoRA (Dettmers et al., NeurIPS 2023): the base is prepared with PEFT's
`prepare_model_for_kbit_training` and adapters train in the compute dtype. Reward models (task seq_cls) use
PEFT's SEQ_CLS task, which trains and saves the `score` head in full (modules_to_save).

The streaming merge plan (`plan_merge`, used by `tunekit merge`) is written here per base tensor so that only
one base tensor is in memory at a time: W' = W + s·B·A with s = α/r (rsLoRA α/√r); DoRA renormalises each
output row, W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row (PEFT's `DoraLinearLayer.get_weight_norm`, dim=1). Folding
in memory (`fold`) is PEFT's own `merge_and_unload`; tests check the two agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunekit.adapters import AdapterKind, AttachContext, TensorEdits, register
from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_config(cfg: AdapterConfig, ctx: AttachContext, **extra: Any):
    """The PEFT LoraConfig for a recipe's adapter section (shared by the LoRA-family methods)."""
    from peft import LoraConfig, TaskType

    kwargs: dict[str, Any] = dict(
        task_type=TaskType.SEQ_CLS if ctx.task == "seq_cls" else TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.method == "dora",
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,  # SEQ_CLS adds `score`
        bias="none",
    )
    if ctx.new_token_ids:
        kwargs["trainable_token_indices"] = list(ctx.new_token_ids)
    kwargs.update(extra)
    return LoraConfig(**kwargs)


def prepare_base(model: Any, ctx: AttachContext) -> Any:
    """QLoRA preparation for quantized bases; input grads for checkpointing otherwise."""
    if ctx.quantized and not ctx.meta:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.gradient_checkpointing)
    if ctx.gradient_checkpointing and not ctx.meta:
        model.enable_input_require_grads()
    return model


def wrap(model: Any, peft_config: Any, ctx: AttachContext) -> Any:
    from peft import get_peft_model

    return get_peft_model(prepare_base(model, ctx), peft_config)


def build_lora(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    """LoRA (method lora) or DoRA (method dora) on the configured targets."""
    return wrap(model, lora_config(cfg, ctx), ctx)


# ------------------------------------------------------------------------------------------------ saved folders


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TunekitError(f"{file}: cannot read JSON ({exc})") from None


def is_peft_lora(folder: Path) -> bool:
    file = Path(folder) / ADAPTER_CONFIG
    return file.is_file() and str(_read_json(file).get("peft_type", "")).upper() == "LORA"


def load_lora(model: Any, folder: Path) -> Any:
    """PEFT's own loader (rank/alpha patterns, DoRA, modules_to_save, trainable tokens)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder))


def fold_lora(model: Any, folder: Path) -> Any:
    """W' = W + s·B·A (DoRA: renormalised rows) in memory: PEFT's `merge_and_unload`."""
    return load_lora(model, folder).merge_and_unload()


_UNSUPPORTED_LORA = {
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "lora_bias",
}


def plan_merge(folder: Path, base: Any) -> TensorEdits:
    """Per base tensor W: W + s·ΔW (LoRA), the DoRA renormalisation, or a replacement (modules_to_save)."""
    import torch
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_json(folder / ADAPTER_CONFIG)
    where = f"adapter '{folder}'"
    for key, what in _UNSUPPORTED_LORA.items():
        if cfg.get(key):
            raise TunekitError(f"{where}: {what} is not supported by tunekit merge ({ADAPTER_CONFIG}: '{key}')")
    if cfg.get("bias", "none") != "none":
        raise TunekitError(f"{where}: bias='{cfg['bias']}' is not supported (only bias='none')")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise TunekitError(f"adapter weights '{folder / ADAPTER_WEIGHTS}' not found")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
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
        if tuple(value.shape) != tuple(base.info(tname).shape):
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


SUM_REFUSAL = (
    "plain LoRA adapters cannot be summed into one adapter of the same size: "
    "(B1+B2)(A1+A2) != B1·A1 + B2·A2, "
    "so the result would not be the sum of the updates; fold each into the base with "
    "`tunekit merge --base BASE --adapter A -o OUT` and merge the models (e.g. task_arithmetic), or use a "
    "summable adapter type"
)

KIND = register(
    AdapterKind(
        "lora",
        build_lora,
        "LoRA: W' = W + (alpha/r) B A; DoRA: W' = m (W + sBA) / ||W + sBA||_c",
        methods=("lora", "dora"),
        detect=is_peft_lora,
        load=load_lora,
        fold=fold_lora,
        plan_merge=plan_merge,
        summable=None,
        sum_refusal=SUM_REFUSAL,
        export_lora=lambda folder: Path(folder),  # already a plain PEFT LoRA
    )
)
