"""Load what a run produced: a run directory, an adapter folder, or a plain model folder / alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunekit.config.schema import ModelConfig
from tunekit.errors import TunekitError


def run_base(run: Path) -> ModelConfig:
    """The `model` section a run was trained with (from its recipe.yaml)."""
    recipe = run / "recipe.yaml"
    if not recipe.is_file():
        raise TunekitError(f"'{run}' has no recipe.yaml: not a tunekit run directory")
    data = yaml.safe_load(recipe.read_text()) or {}
    return ModelConfig.model_validate(data.get("model", {}))


def load_any(target: str, base: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a run dir, an adapter folder (base from its config or `base`), or a model."""
    from tunekit.models.load import load_model, load_tokenizer

    path = Path(target)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        cfg = run_base(path)
        if (path / "model").is_dir():
            return _load_plain(cfg.model_copy(update={"name": str(path / "model")}))
        adapter = path / "adapter"
        if not adapter.is_dir():
            raise TunekitError(f"run '{path}' has neither adapter/ nor model/ (did it finish?)")
        return _load_adapter(cfg, adapter)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        import json

        base_name = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise TunekitError(f"adapter '{path}' does not name its base model; pass --base")
        return _load_adapter(ModelConfig(name=base_name), path)
    cfg = ModelConfig(name=target)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


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
