"""LoRA and DoRA through PEFT.

LoRA (Hu et al., ICLR 2022): W' = W + (α/r)·B·A, B ∈ R^{d_out×r} zero-initialised, A ∈ R^{r×d_in};
trainable parameters per target module: r·(d_in + d_out). rsLoRA (Kalajdzievski 2023) scales by α/√r.
DoRA (Liu et al., ICML 2024): W' = m · (W + (α/r)BA) / ‖W + (α/r)BA‖_c, adding the magnitude vector m (d_out).
With a 4/8-bit base this is QLoRA (Dettmers et al., NeurIPS 2023): the base is prepared with PEFT's
`prepare_model_for_kbit_training` and adapters train in the compute dtype.
"""

from __future__ import annotations

from typing import Any

from tunekit.adapters import AttachContext, register
from tunekit.config.schema import AdapterConfig


def lora_config(cfg: AdapterConfig, ctx: AttachContext, **extra: Any):
    """The PEFT LoraConfig for a recipe's adapter section (shared by the LoRA-family methods)."""
    from peft import LoraConfig, TaskType

    targets = cfg.targets if isinstance(cfg.targets, list) else cfg.targets
    seq_cls = ctx.task == "seq_cls"
    modules_to_save = list(cfg.modules_to_save or [])
    if seq_cls and "score" not in modules_to_save:  # the new reward head trains in full and is saved
        modules_to_save.append("score")
    kwargs: dict[str, Any] = dict(
        task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.method == "dora",
        modules_to_save=modules_to_save or None,
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


@register("lora", "LoRA: W' = W + (alpha/r) B A")
def build_lora(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    return wrap(model, lora_config(cfg, ctx), ctx)


@register("dora", "DoRA: W' = m (W + sBA) / ||W + sBA||_c")
def build_dora(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    return wrap(model, lora_config(cfg, ctx), ctx)
