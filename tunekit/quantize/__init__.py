"""Quantize models for serving: GGUF (llama.cpp / Ollama), GPTQ and AWQ (vLLM), bitsandbytes."""

from __future__ import annotations

__all__ = ["quantize"]


def quantize(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export of tunekit.quantize.api.quantize
    from tunekit.quantize.api import quantize as _quantize

    return _quantize(*args, **kwargs)
