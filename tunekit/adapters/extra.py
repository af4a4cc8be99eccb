"""Registers the adapters of issue #3 (PiSSA, MiLoRA, LoRA-XS, SVFT) with the adapter registry, their
loaders with `tunekit.adapters.load_adapter`, and the LoRA-XS/SVFT kinds with `tunekit merge` (fold into the
base; adapter_sum). Imported by `tunekit.adapters._load_builtin()`.
"""

from __future__ import annotations

from tunekit.adapters import lora_xs, milora, pissa, svft  # noqa: F401  (registration side effects)


def register_merge_types() -> None:
    """Teach `tunekit.merge.adapters` the LoRA-XS and SVFT layouts (PiSSA/MiLoRA save plain PEFT LoRA)."""
    from tunekit.merge.adapters import AdapterType, register_adapter_type

    ignore = ("base_model_name_or_path", "inference_mode", "peft_version", "revision")
    register_adapter_type(
        AdapterType(
            "lora_xs",
            lora_xs.is_lora_xs,
            lora_xs.plan_merge,
            lora_xs.summable,
            config_file=lora_xs.CONFIG,
            weights_file=lora_xs.WEIGHTS,
            ignore_config_keys=ignore,
            finalize=lora_xs.export_peft_lora,  # the summed R needs a fresh plain-LoRA export
        )
    )
    register_adapter_type(
        AdapterType(
            "svft",
            svft.is_svft,
            svft.plan_merge,
            svft.summable,
            config_file=svft.CONFIG,
            weights_file=svft.WEIGHTS,
            ignore_config_keys=ignore,
        )
    )


register_merge_types()
