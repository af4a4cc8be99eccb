"""Load what a run produced: a run directory, an adapter folder, or a plain model folder / alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.config.schema import ModelConfig
from tunekit.errors import TunekitError
from tunekit.run.locate import base_of, locate


def load_any(target: str, base: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for a run dir, an adapter folder (base from its run or config, or `base`), a model
    folder, a hub id or an alias. Model code runs only with `trust_remote_code` from the caller (the user's
    command line): the run's recipe or the adapter's config never turn it on (see locate.untrusted)."""
    from tunekit.errors import reading

    trust = {"trust_remote_code": trust_remote_code}
    loc = locate(target)
    if loc is None:  # hub id or alias
        return _load_plain(ModelConfig(name=target, **trust))
    if loc.model_dir is not None:
        cfg = loc.base or ModelConfig(name=str(loc.model_dir))
        with reading(loc.model_dir):
            return _load_plain(cfg.model_copy(update={"name": str(loc.model_dir), **trust}))
    cfg = ModelConfig(name=base) if base else base_of(loc)
    if cfg is None:
        raise TunekitError(f"adapter '{loc.adapter_dir}' does not name its base model; pass --base")
    with reading(loc.adapter_dir):
        return _load_adapter(cfg.model_copy(update=trust), loc.adapter_dir)


def _load_plain(cfg: ModelConfig):
    from tunekit.models.load import load_model, load_tokenizer

    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def _load_adapter(cfg: ModelConfig, adapter: Path):
    """Base + adapter. The tokenizer saved beside the adapter wins (it may carry added template tokens)."""
    from transformers import AutoTokenizer

    from tunekit.adapters import load_adapter
    from tunekit.models.load import fix_pad_token, load_model

    tok = AutoTokenizer.from_pretrained(str(adapter)) if (adapter / "tokenizer_config.json").is_file() else None
    if tok is None:
        from tunekit.models.load import load_tokenizer

        tok = load_tokenizer(cfg)
    fix_pad_token(tok)
    model = load_model(cfg, tok)
    return load_adapter(model, adapter), tok
