"""What a folder on disk is: a tunekit run directory, an adapter, or a full model — and which base it needs.

Every command that accepts "a model, an adapter or a run" (eval, merge, quantize, and later stages) asks here,
so the layout rules live in one place:
- run: `RUN/recipe.yaml` + `RUN/adapter/` (or `RUN/model/` for full fine-tuning); base = the recipe's `model`.
- adapter: a folder with `adapter_config.json` (PEFT) or a tunekit adapter config (LoRA-XS, SVFT); base = the
  recipe of the run it sits in, else the adapter config's `base_model_name_or_path`.
- model: a folder with `config.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunekit.config.schema import ModelConfig
from tunekit.errors import TunekitError

# PEFT's config, then tunekit's own adapter formats (tunekit/adapters/lora_xs.py, svft.py).
ADAPTER_CONFIGS = ("adapter_config.json", "lora_xs_config.json", "svft_config.json")


@dataclass(frozen=True)
class Located:
    kind: Literal["run", "adapter", "model"]
    path: Path
    model_dir: Path | None = None  # a loadable full model (model kind, or RUN/model)
    adapter_dir: Path | None = None  # the adapter (adapter kind, or RUN/adapter)
    run_dir: Path | None = None  # the run it belongs to, if any
    base: ModelConfig | None = None  # the base model section the adapter/run was trained with
    base_file: Path | None = None  # the adapter_config.json `base` was read from (an adapter outside a run)


def untrusted(section: dict[str, Any], source: Path) -> dict[str, Any]:
    """Trust never travels with artifacts: drop `trust_remote_code: true` read from a file being loaded (a run's
    recipe, an adapter or merge config), with a warning. Only the user's command line or own recipe enables it."""
    if section.get("trust_remote_code"):
        print(f"warning: {source}: ignoring trust_remote_code: true (model code runs only when you ask for it "
              "yourself, e.g. --trust-remote-code)", file=sys.stderr)
    return {k: v for k, v in section.items() if k != "trust_remote_code"}


def run_model_section(run: Path) -> ModelConfig:
    """The `model` section a run was trained with (from its recipe.yaml), without its trust_remote_code."""
    from tunekit.config.load import read_yaml_file

    recipe = run / "recipe.yaml"
    data = read_yaml_file(recipe, "run recipe") or {}
    section: Any = data.get("model", {}) if isinstance(data, dict) else {}
    if not isinstance(section, dict):
        raise TunekitError(f"{recipe}: the model section must be a mapping")
    try:
        return ModelConfig.model_validate(untrusted(section, recipe))
    except ValueError as exc:
        raise TunekitError(f"{recipe}: invalid model section ({str(exc).splitlines()[0]})") from None


def read_json_config(path: Path) -> dict[str, Any]:
    """A JSON config file of a folder being loaded, as a mapping; corrupt → TunekitError naming the file."""
    from tunekit.errors import reading

    with reading(path):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TunekitError(f"{path}: expected a JSON object")
    return data


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """`folder/adapter_config.json` checked before PEFT reads it: a JSON object with a known `peft_type`, a rank
    `r` that is a whole number >= 1, a finite `lora_alpha`, a `base_model_name_or_path` that is a name. Anything
    else is a TunekitError naming the file (PEFT would fail deep in its loader, or take a string for a rank)."""
    import math

    file = folder / "adapter_config.json"
    config = read_json_config(file)
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise TunekitError(f"{file}: no peft_type (a PEFT adapter config names its type, e.g. \"peft_type\": "
                           "\"LORA\")")
    if peft_type != "LORA":  # the common case, without peft's import
        from peft import PeftType

        known = [t.value for t in PeftType]
        if peft_type not in known:  # PEFT looks the type up as written
            import difflib

            close = difflib.get_close_matches(str(peft_type).upper(), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise TunekitError(f"{file}: unknown peft_type {peft_type!r} ({hint}PEFT knows {len(known)} types; "
                               "tunekit trains and loads LORA)")
    for key in ("r", "lora_alpha"):
        if key not in config:
            continue
        value = config[key]
        if key == "r" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise TunekitError(f"{file}: r = {value!r} is not a rank (a whole number >= 1)")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "lora_alpha" and not (number and math.isfinite(value)):
            raise TunekitError(f"{file}: lora_alpha = {value!r} is not a finite number")
    base = config.get("base_model_name_or_path")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise TunekitError(f"{file}: base_model_name_or_path = {base!r} names no model")
    return config


def check_recorded_base(name: str | None, file: Path | None) -> str | None:
    """`name`, the base an adapter's `file` (adapter_config.json) records; a path that does not exist is refused
    naming the file (else the resolver would report a model name the user never typed)."""
    from tunekit.models.resolve import looks_like_path

    if name is not None and file is not None and looks_like_path(name) and not Path(name).expanduser().exists():
        raise TunekitError(f"{file}: base_model_name_or_path '{name}' does not exist")
    return name


def base_of(loc: Located) -> ModelConfig | None:
    """The base model an adapter is loaded on (checked with `check_recorded_base` when it came from the adapter's
    config)."""
    check_recorded_base(loc.base.name if loc.base else None, loc.base_file)
    return loc.base


def is_adapter_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ADAPTER_CONFIGS)


def locate(path: str | Path) -> Located | None:
    """Classify an existing folder; None when `path` is not a folder (a hub id or an alias)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if (p / "recipe.yaml").is_file():
        base = run_model_section(p)
        if (p / "adapter" / "adapter_config.json").is_file():
            read_adapter_config(p / "adapter")
        if (p / "adapter").is_dir():
            return Located("run", p, adapter_dir=p / "adapter", run_dir=p, base=base)
        if (p / "model").is_dir():
            return Located("run", p, model_dir=p / "model", run_dir=p, base=base)
        raise TunekitError(f"run '{p}' has neither adapter/ nor model/ (did training finish?)")
    if is_adapter_dir(p):
        run = p.parent if (p.parent / "recipe.yaml").is_file() else None
        base = run_model_section(run) if run is not None else None
        config = read_adapter_config(p) if (p / "adapter_config.json").is_file() else {}
        base_file = None
        if base is None and config:
            config = untrusted(config, p / "adapter_config.json")
            name = config.get("base_model_name_or_path")
            base, base_file = (ModelConfig(name=name), p / "adapter_config.json") if name else (None, None)
        return Located("adapter", p, adapter_dir=p, run_dir=run, base=base, base_file=base_file)
    if (p / "config.json").is_file():
        return Located("model", p, model_dir=p)
    raise TunekitError(f"'{p}' is not a model folder (config.json), an adapter or a tunekit run directory")
