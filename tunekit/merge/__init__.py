"""`tunekit merge`: mergekit-compatible model merging, streamed tensor by tensor, plus adapter folding.

Public entry points: `merge_models` (a mergekit YAML config or `MergeConfig`), `merge_adapter` (fold a
PEFT/tunekit
adapter into its base) and `sum_adapters` (weighted sum of same-shaped summable adapters).
"""

from __future__ import annotations

from typing import Any

__all__ = ["merge_models", "merge_adapter", "sum_adapters", "load_config", "validate_config"]


def __getattr__(name: str) -> Any:  # lazy: keep `import tunekit.merge` free of torch
    if name == "merge_models":
        from tunekit.merge.engine import merge_models

        return merge_models
    if name in ("merge_adapter", "sum_adapters"):
        from tunekit.merge import adapters

        return getattr(adapters, name)
    if name in ("load_config", "validate_config"):
        from tunekit.merge import config

        return getattr(config, name)
    raise AttributeError(name)
