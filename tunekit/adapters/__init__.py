"""Adapters: one registry of methods; each method is ONE registration (`AdapterKind`) in its own module.

A kind says everything tunekit does with it: attach (build the trainable model), save, detect and load a saved
folder, export it as a plain PEFT LoRA, plan a streaming merge into a base on disk (`tunekit merge`), which
tensors `adapter_sum` adds, and fold a saved adapter into a base model in memory (chaining runs). Training
stages, eval, quantize and `tunekit merge` all read this registry; nothing else knows an adapter's layout.

Built in (`_load_builtin`): lora.py (lora, dora), pissa.py, milora.py, lora_xs.py, svft.py, full.py (none).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: base tensor name -> function mapping the float32 base tensor W to the merged W'.
TensorEdits = dict[str, Callable[[Any], Any]]
Task = Literal["causal_lm", "seq_cls"]
SEQ_CLS_HEADS = ("score", "classifier")  # the heads transformers' sequence-classification models add


@dataclass
class AttachContext:
    """What a method may need beyond its own config."""

    quantized: bool = False  # base loaded in 4/8-bit (QLoRA-style)
    gradient_checkpointing: bool = False
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by the chat template: train them
    meta: bool = False  # model lives on the meta device (counting only: no SVD, no data)
    task: Task = "causal_lm"  # "seq_cls": a reward model (AutoModelForSequenceClassification, `score` head)


@dataclass(frozen=True)
class AdapterKind:
    """One adapter method and everything tunekit does with it.

    build(model, cfg, ctx) -> model to train. save(model, cfg, out_dir); None: PEFT's `save_pretrained`.
    methods: the recipe's `adapter.method` values this kind builds (default: its name).
    detect(folder) -> bool: `folder` holds an adapter saved in this kind's format. None: the kind saves in
      another kind's format (`saved_as`: PiSSA and MiLoRA save a plain PEFT LoRA, "lora").
    load(model, folder) -> model with the adapter applied (not merged).
    fold(model, folder) -> the plain model with the adapter merged into its weights, in memory.
    plan_merge(folder, base) -> TensorEdits: the streaming merge into a base on disk (`tunekit merge`); `base`
      answers `name in base` and `base.info(name).shape` (tunekit.merge.io.SafetensorsFolder, or
      `ModelWeights` over a model in memory).
    summable(tensor_name) -> bool: the tensors `adapter_sum` adds (None: cannot be summed, `sum_refusal` says
      why); `finalize(folder)` rebuilds derived files of a summed folder.
    export_lora(folder) -> folder of a plain PEFT LoRA equal to the adapter (None: `export_refusal` says why).
    seq_cls_refusal: None when the kind trains reward models (task "seq_cls"), else why it cannot.
    """

    name: str
    build: Callable[[Any, AdapterConfig, AttachContext], Any]
    description: str = ""
    methods: tuple[str, ...] = ()
    save: Callable[[Any, AdapterConfig, Path], None] | None = None
    detect: Callable[[Path], bool] | None = None
    saved_as: str | None = None
    load: Callable[[Any, Path], Any] | None = None
    fold: Callable[[Any, Path], Any] | None = None
    plan_merge: Callable[[Path, Any], TensorEdits] | None = None
    summable: Callable[[str], bool] | None = None
    sum_refusal: str = "this adapter type does not support adapter_sum"
    finalize: Callable[[Path], Any] | None = None
    export_lora: Callable[[Path], Path] | None = None
    export_refusal: str = ""
    seq_cls_refusal: str | None = None
    config_file: str = "adapter_config.json"
    weights_file: str = "adapter_model.safetensors"
    ignore_config_keys: tuple[str, ...] = ("inference_mode", "peft_version", "revision")

    @property
    def recipe_methods(self) -> tuple[str, ...]:
        return self.methods or (self.name,)


REGISTRY: dict[str, AdapterKind] = {}
_BUILTIN = ("full", "lora", "pissa", "milora", "lora_xs", "svft")
_BUILTINS_LOADED = False


def register(kind: AdapterKind) -> AdapterKind:
    """Add a kind. A name or recipe method registered twice is a programming error. Later registrations are
    detected first (a specialisation of a saved format registers after the format itself)."""
    if kind.name in REGISTRY:
        raise ValueError(f"adapter kind '{kind.name}' is registered twice")
    taken = {m: k.name for k in REGISTRY.values() for m in k.recipe_methods}
    for m in kind.recipe_methods:
        if m in taken:
            raise ValueError(f"adapter.method '{m}' of kind '{kind.name}' is already built by '{taken[m]}'")
    REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in _BUILTIN:
        importlib.import_module(f"tunekit.adapters.{module}")


def kinds() -> list[AdapterKind]:
    _load_builtin()
    return list(REGISTRY.values())


def get_method(name: str) -> AdapterKind:
    """The kind that builds recipe `adapter.method: name`."""
    _load_builtin()
    for kind in REGISTRY.values():
        if name in kind.recipe_methods:
            return kind
    known = sorted(m for k in REGISTRY.values() for m in k.recipe_methods)
    raise TunekitError(f"adapter.method: unknown method '{name}' (known: {', '.join(known)})")


def get_kind(name: str) -> AdapterKind:
    _load_builtin()
    if name not in REGISTRY:
        raise TunekitError(f"unknown adapter kind '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def kind_of(folder: str | Path) -> AdapterKind:
    """The kind whose saved format `folder` holds (TunekitError when none)."""
    _load_builtin()
    folder = Path(folder)
    for kind in reversed(list(REGISTRY.values())):
        if kind.detect is not None and kind.detect(folder):
            return kind
    import json

    peft_type = None
    if (folder / "adapter_config.json").is_file():
        try:
            peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
        except (OSError, ValueError):
            raise TunekitError(f"{folder / 'adapter_config.json'}: cannot read JSON") from None
    what = f"peft_type '{peft_type}'" if peft_type else "no known adapter files"
    known = ", ".join(k.name for k in REGISTRY.values() if k.detect is not None)
    raise TunekitError(f"adapter '{folder}': {what}; tunekit reads: {known}")


# ------------------------------------------------------------------------------------------------ attach


def _matches(name: str, key: str) -> bool:
    """PEFT's rule for a list entry: the full module name, or its dotted suffix."""
    return name == key or name.endswith("." + key)


def check_targets(model: Any, cfg: AdapterConfig, task: Task = "causal_lm") -> None:
    """Refuse `adapter.targets` / `adapter.modules_to_save` entries that match no module of `model` (works on the
    meta device, so `--dry-run` catches them): a typo would otherwise train something else or nothing."""
    if cfg.method == "none":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(cfg.targets, list):
        missing = [t for t in cfg.targets if not any(_matches(n, t) for n in names)]
        if missing:
            raise TunekitError(
                f"adapter.targets: {_listed(missing)} no module of the model "
                f"(module names end with e.g. {_suffix_examples(names)})"
            )
    elif cfg.targets != "all-linear":
        try:
            pattern = re.compile(cfg.targets)
        except re.error as exc:
            raise TunekitError(f"adapter.targets: {cfg.targets!r} is not a valid regular expression ({exc})") from None
        if not any(pattern.fullmatch(n) for n in names):
            raise TunekitError(f"adapter.targets: the regular expression {cfg.targets!r} matches no module name")
    extra = [m for m in cfg.modules_to_save or [] if not (task == "seq_cls" and m in SEQ_CLS_HEADS)]
    missing = [m for m in extra if not any(_matches(n, m) for n in names)]
    if missing:
        raise TunekitError(
            f"adapter.modules_to_save: {_listed(missing)} no module of the model "
            f"(module names end with e.g. {_suffix_examples(names)})"
        )


def _listed(names: list[str]) -> str:
    return ", ".join(map(repr, names)) + (" match" if len(names) > 1 else " matches")


def _suffix_examples(names: list[str], limit: int = 8) -> str:
    seen: list[str] = []
    for n in names:
        tail = n.rsplit(".", 1)[-1]
        if not tail.isdigit() and tail not in seen:
            seen.append(tail)
    return ", ".join(seen[-limit:])


def attach(model: PreTrainedModel, cfg: AdapterConfig, ctx: AttachContext | None = None) -> PreTrainedModel:
    """Make `model` trainable with the configured method; returns the model to train."""
    ctx = ctx or AttachContext()
    if ctx.quantized and cfg.method == "none":
        raise TunekitError(
            "adapter.method 'none' (full fine-tuning) cannot train a 4/8-bit base; choose an adapter (QLoRA)"
        )
    kind = get_method(cfg.method)
    if ctx.task == "seq_cls" and kind.seq_cls_refusal:
        raise TunekitError(f"adapter.method={cfg.method} cannot train a reward model: {kind.seq_cls_refusal}")
    check_targets(model, cfg, ctx.task)
    return kind.build(model, cfg, ctx)


def save_adapter(model: Any, cfg: AdapterConfig, out_dir: Path) -> None:
    """Write the trained adapter (its kind's layout) or, for full fine-tuning, the model."""
    kind = get_method(cfg.method)
    if kind.save is not None:
        kind.save(model, cfg, Path(out_dir))
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


# ------------------------------------------------------------------------------------------------ saved folders


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Apply a saved adapter (any registered format) to a loaded base, unmerged."""
    kind = kind_of(adapter_dir)
    if kind.load is None:
        raise TunekitError(f"adapter '{adapter_dir}': kind '{kind.name}' cannot be loaded onto a base")
    return kind.load(model, Path(adapter_dir))


def fold_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """The plain model W' = W + ΔW: the saved adapter merged into `model`'s (16/32-bit) weights in memory."""
    kind = kind_of(adapter_dir)
    if kind.fold is None:
        raise TunekitError(f"adapter '{adapter_dir}': kind '{kind.name}' cannot be folded into a base model")
    if getattr(model, "hf_quantizer", None) is not None:
        raise TunekitError(
            f"adapter '{adapter_dir}': folding needs the base in 16/32-bit, not 4/8-bit (load it unquantized, "
            "fold, then quantize)"
        )
    return kind.fold(model, Path(adapter_dir))


def export_lora(adapter_dir: str | Path) -> Path:
    """The folder of a plain PEFT LoRA equal to the saved adapter (written by the kind if it needs one)."""
    kind = kind_of(adapter_dir)
    if kind.export_lora is None:
        raise TunekitError(f"adapter '{adapter_dir}': {kind.name} has no plain-LoRA form: {kind.export_refusal}")
    return kind.export_lora(Path(adapter_dir))


class ModelWeights:
    """A model in memory seen as `plan_merge` sees a base on disk: tensor names (tied copies once, as
    `save_pretrained` writes them), shapes, and float32 reads."""

    def __init__(self, model: Any) -> None:
        self.tensors: dict[str, Any] = {}
        seen: set[int] = set()
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen or t.data_ptr() in seen:
                continue
            seen.update({id(t), t.data_ptr()})
            self.tensors[name] = t

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> Any:
        from types import SimpleNamespace

        t = self.tensors[name]
        return SimpleNamespace(name=name, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))


def fold_with_plan(model: Any, folder: Path, plan_merge: Callable[[Path, Any], TensorEdits]) -> Any:
    """Apply a kind's streaming merge plan to a model in memory: W ← edit(W as float32), cast back in place.
    The same arithmetic as `tunekit merge`, so the folded model equals the merged folder."""
    import torch

    weights = ModelWeights(model)
    edits = plan_merge(Path(folder), weights)
    with torch.no_grad():
        for name, edit in edits.items():
            t = weights.tensors[name]
            new = edit(t.detach().to(torch.float32))
            if tuple(new.shape) != tuple(t.shape):
                raise TunekitError(f"adapter '{folder}': merged '{name}' has shape {list(new.shape)}, "
                                   f"the model {list(t.shape)}")
            t.data.copy_(new.to(device=t.device, dtype=t.dtype))
    return model
