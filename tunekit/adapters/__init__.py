"""Adapters: a registry of methods, each turning a base model into a trainable (PEFT) model.

Every training stage calls `attach()`; every method registers itself with `@register("name")`, so a new method
is one module. A method may also supply `save` (e.g. export to plain LoRA) and `count` (trainable parameters
without building, for `--dry-run` on huge configs); the defaults use PEFT's `save_pretrained` and count the
trainable tensors of the model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class AttachContext:
    """What a method may need beyond its own config."""

    quantized: bool = False  # base loaded in 4/8-bit (QLoRA-style)
    gradient_checkpointing: bool = False
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by the chat template: train them
    meta: bool = False  # model lives on the meta device (counting only: no SVD, no data)
    task: str = "causal_lm"  # "seq_cls": a reward model, whose new `score` head trains in full and is saved


@dataclass
class AdapterMethod:
    name: str
    build: Callable[[Any, AdapterConfig, AttachContext], Any]
    save: Callable[[Any, AdapterConfig, Path], None] | None = None
    description: str = ""


REGISTRY: dict[str, AdapterMethod] = {}
_BUILTINS_LOADED = False


def register(name: str, description: str = "", save: Callable | None = None):
    """Decorator: `@register("lora")` over `build(model, cfg, ctx) -> model`."""

    def deco(build: Callable) -> Callable:
        REGISTRY[name] = AdapterMethod(name, build, save, description or (build.__doc__ or "").strip())
        return build

    return deco


def _load_builtin() -> None:
    import importlib

    from tunekit.adapters import full, lora  # noqa: F401  (registration side effect)

    try:  # methods from the adapters issue (pissa, milora, lora_xs, svft), when present
        importlib.import_module("tunekit.adapters.extra")
    except ModuleNotFoundError as exc:
        if exc.name != "tunekit.adapters.extra":
            raise


def get_method(name: str) -> AdapterMethod:
    _load_builtin()
    if name not in REGISTRY:
        raise TunekitError(f"adapter.method: unknown method '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def attach(model: PreTrainedModel, cfg: AdapterConfig, ctx: AttachContext | None = None) -> PreTrainedModel:
    """Make `model` trainable with the configured method; returns the model to train."""
    ctx = ctx or AttachContext()
    if ctx.quantized and cfg.method == "none":
        raise TunekitError(
            "adapter.method 'none' (full fine-tuning) cannot train a 4/8-bit base; choose an adapter (QLoRA)"
        )
    if ctx.task == "seq_cls" and cfg.method in ("lora_xs", "svft"):
        raise TunekitError(
            f"adapter.method '{cfg.method}' cannot train a reward model: its frozen-SVD modules leave no place for "
            "the new score head; use lora, dora, pissa, milora or none"
        )
    return get_method(cfg.method).build(model, cfg, ctx)


def save_adapter(model: Any, cfg: AdapterConfig, out_dir: Path) -> None:
    """Write the trained adapter (standard PEFT layout) or, for full fine-tuning, the model."""
    method = get_method(cfg.method)
    if method.save is not None:
        method.save(model, cfg, out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)


def count_trainable(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # 4-bit params pack two values per byte; count logical parameters
        if hasattr(p, "quant_state") and getattr(p, "quant_state", None) is not None:
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


LOADERS: list[Callable[[Any, Path], Any | None]] = []


def register_loader(fn: Callable[[Any, Path], Any | None]) -> Callable:
    """Register `fn(base_model, adapter_dir) -> model | None` for a tunekit-specific adapter format."""
    LOADERS.append(fn)
    return fn


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """Apply a saved adapter to a loaded base: tunekit formats first (registered loaders), else plain PEFT."""
    _load_builtin()
    for loader in LOADERS:
        loaded = loader(model, Path(adapter_dir))
        if loaded is not None:
            return loaded
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))
