"""GPTQ and AWQ weight-only quantization through llmcompressor (the `gptq` extra), saved in the
compressed-tensors format that transformers and vLLM load.

- GPTQ (Frantar et al., 2023): quantize columns one at a time and push each rounding error onto the
  columns not yet quantized, weighted by the inverse Hessian H = 2·X·Xᵀ of the layer's calibration inputs,
  minimising ‖WX − ŴX‖².
- AWQ (Lin et al., 2024): scale salient input channels by s = mean|x|^α before rounding (and the inverse into
  the previous op), with α grid-searched per block to minimise the block's output error.

Both write W4A16 (4-bit integer weights, 16-bit activations) with per-group scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

INSTALL_HINT = "install llmcompressor: `pip install 'tunekit[gptq]'`"
GROUP_SIZES = (128, 64, 32, 16, 8)


def require_llmcompressor() -> Any:
    try:
        import llmcompressor
    except ImportError:
        raise TunekitError(f"llmcompressor is not installed; {INSTALL_HINT}") from None
    return llmcompressor


def pick_group_size(widths: list[int], requested: int = 128) -> int:
    """Largest group size ≤ `requested` (from 128, 64, 32, 16, 8) that divides every layer input width."""
    for g in (g for g in GROUP_SIZES if g <= requested):
        if all(w % g == 0 for w in widths):
            return g
    raise TunekitError(f"no group size in {GROUP_SIZES} divides the layer widths {sorted(set(widths))}")


def _linear_widths(model: Any) -> list[int]:
    import torch

    return [
        m.in_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]


def _allow_cpu_only_awq() -> None:
    """AWQ pins cached activations before its grid search (llm-compressor PR #2813, "Move call to
    pin_memory from offload to just before fetch"); `Tensor.pin_memory()` needs an accelerator and fails
    on CPU-only machines. Without one, pinning buys nothing, so make it a no-op there."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache.pin_memory, "_tunekit_cpu_safe", False):
        return
    original = IntermediatesCache.pin_memory

    def pin_memory(self: Any, *args: Any, **kwargs: Any) -> None:
        if torch.accelerator.is_available():
            original(self, *args, **kwargs)

    pin_memory._tunekit_cpu_safe = True  # type: ignore[attr-defined]
    IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]


def quantize_w4a16(
    model_folder: str | Path,
    output: str | Path,
    method: str,
    texts: list[str],
    *,
    samples: int = 128,
    max_length: int = 512,
    group_size: int = 128,
    bits: int = 4,
) -> dict[str, Any]:
    """Quantize the HF model in `model_folder` with GPTQ or AWQ to `output` (compressed-tensors folder)."""
    require_llmcompressor()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = method.lower()
    if method not in ("gptq", "awq"):
        raise TunekitError(f"unknown method {method!r} (gptq, awq)")
    if not texts:
        raise TunekitError("no calibration texts")
    tok = AutoTokenizer.from_pretrained(model_folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype)
    model.to(device)
    gs = pick_group_size(_linear_widths(model), group_size)

    enc = [tok(t, truncation=True, max_length=max_length, add_special_tokens=True) for t in texts[:samples]]
    enc = [e for e in enc if len(e["input_ids"]) > 1]
    ds = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in enc], "attention_mask": [e["attention_mask"] for e in enc]}
    )
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": method == "gptq",
        "strategy": "group",
        "group_size": gs,
    }
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        _allow_cpu_only_awq()
        # llmcompressor 0.14: AWQ is a smoothing transform; the W4A16 scheme comes from a QuantizationModifier.
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]

    from llmcompressor import oneshot

    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(enc),
        max_seq_length=max_length,
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(str(output), save_compressed=True)
    tok.save_pretrained(str(output))
    return {
        "method": method,
        "scheme": f"W{bits}A16",
        "group_size": gs,
        "samples": len(enc),
        "device": device,
    }
