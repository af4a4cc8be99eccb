"""Sanity of the sizes a model's config.json states, checked before anything is allocated.

A negative, zero, fractional or absurd size (10^7 layers) would otherwise fail deep inside transformers (an
internal error) or hang while the modules are built; here it is one line naming the file and the key. The
upper bounds are far above any published model (the largest have ~128 layers, hidden 16-25k, vocab 256k).
"""

from __future__ import annotations

from typing import Any

from tunekit.errors import TunekitError

#: key → the largest value accepted.
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 18,
    "n_embd": 1 << 18,
    "d_model": 1 << 18,
    "intermediate_size": 1 << 21,
    "n_inner": 1 << 21,
    "num_hidden_layers": 4096,
    "n_layer": 4096,
    "num_layers": 4096,
    "num_attention_heads": 1 << 14,
    "n_head": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 14,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 26,
    "n_positions": 1 << 26,
    "num_experts": 1 << 14,
    "num_local_experts": 1 << 14,
}
#: nested configs of multimodal / encoder-decoder models checked the same way.
NESTED = ("text_config", "decoder", "encoder", "llm_config")


def check_config_sizes(config: dict[str, Any], source: str) -> None:
    """Raise TunekitError when a size in `config` (config.json as a mapping) is not a whole number in
    [1, SIZE_LIMITS[key]] (None means "not set" and passes)."""
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or (
                isinstance(value, float) and not value.is_integer()):
            raise TunekitError(f"{source}: {key} must be a whole number, got {value!r}")
        if not 1 <= value <= limit:
            raise TunekitError(f"{source}: {key} = {value!r} is impossible (expected 1 to {limit:,})")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv = config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise TunekitError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    if isinstance(hidden, int) and isinstance(heads, int) and config.get("head_dim") is None and hidden % heads:
        raise TunekitError(f"{source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    for key in NESTED:
        if isinstance(config.get(key), dict):
            check_config_sizes(config[key], f"{source} ({key})")
