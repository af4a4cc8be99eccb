"""tunekit: fine-tune, align, merge and quantize LLMs from one CLI."""

__version__ = "0.1.0"
