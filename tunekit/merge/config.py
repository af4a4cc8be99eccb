"""mergekit's YAML merge-config schema (the subset tunekit supports), validated strictly.

Supported top-level keys: merge_method, base_model, models (each: model, parameters), parameters, dtype,
out_dtype, tokenizer_source ('base' or a model). Parameter values may be scalars, gradients (a list of numbers
interpolated over the layer index) or conditional lists `[{filter: self_attn, value: ...}, {value: ...}]`,
evaluated exactly as mergekit does: a model's own parameter wins, then the top-level one, then the default;
the first entry whose `filter` is a substring of the tensor name (or has no filter / '*') applies.
Anything else (slices, modules, tokenizer:, chat_template, model+lora references, unknown parameters) is a
TunekitError naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tunekit.errors import TunekitError
from tunekit.merge.io import normalize_dtype
from tunekit.merge.methods import METHODS, REQUIRED

SUPPORTED_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
)
ADAPTER_SUM = "adapter_sum"
#: Extra global parameters mergekit accepts for every method that only matter with `tokenizer_source`.
EMBED_PARAMS = {"embed_slerp": False}


def _check_setting(key: str, value: Any, where: str) -> Any:
    """Validate a ParameterSetting: scalar | list of scalars (gradient) | {filter, value} | list of those."""
    scalar = (int, float, bool, str)
    if isinstance(value, scalar):
        return value
    if isinstance(value, dict):
        extra = set(value) - {"filter", "value"}
        if extra or "value" not in value:
            raise TunekitError(
                f"{where}: parameter '{key}': a conditional entry needs 'value' (and optional "
                f"'filter'), got keys {sorted(value)}"
            )
        if value.get("filter") is not None and not isinstance(value["filter"], str):
            raise TunekitError(f"{where}: parameter '{key}': filter must be a string")
        inner = value["value"]
        if not (
            isinstance(inner, scalar)
            or (isinstance(inner, list) and all(isinstance(e, scalar) for e in inner))
        ):
            raise TunekitError(f"{where}: parameter '{key}': 'value' must be a number or a list of numbers")
        if isinstance(inner, list) and not inner:
            raise TunekitError(f"{where}: parameter '{key}': empty gradient list")
        return value
    if isinstance(value, list):
        if not value:
            raise TunekitError(f"{where}: parameter '{key}': empty list")
        if all(isinstance(e, scalar) for e in value):
            return value
        if all(isinstance(e, dict) for e in value):
            return [_check_setting(key, e, where) for e in value]
        raise TunekitError(f"{where}: parameter '{key}': mix of numbers and filter entries")
    raise TunekitError(f"{where}: parameter '{key}': unsupported value {value!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of a parameter setting for one tensor at layer fraction `t` (0 = first layer, 1 = last).

    A list of numbers g is a gradient: with s = t·(len(g)-1), value = (1-frac(s))·g[⌊s⌋] + frac(s)·g[⌊s⌋+1].
    Conditional lists return the first entry whose filter is a substring of `tensor_name`; None if none match.
    """
    if setting is None or isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(e, bool) for e in setting) or not all(isinstance(e, (int, float)) for e in setting):
        if all(not isinstance(e, dict) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class InputModel(_Strict):
    model: str
    parameters: dict[str, Any] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a model path (string)")
        return v


class MergeConfig(_Strict):
    """A mergekit merge configuration (supported subset). `source` is the file it came from, for messages."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel]
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    source: str = "config"

    def model_names(self) -> list[str]:
        """Every referenced model, in order, base last if not listed in `models`."""
        names = [m.model for m in self.models]
        if self.base_model and self.base_model not in names:
            names.append(self.base_model)
        return names

    def model_parameters(self, name: str) -> dict[str, Any]:
        for m in self.models:
            if m.model == name:
                return m.parameters or {}
        return {}

    def parameter(
        self, key: str, model: str | None, tensor_name: str, t: float, default: Any = REQUIRED
    ) -> Any:
        """mergekit's lookup order: the model's own parameter, then the global one, then `default`."""
        if model is not None:
            own = self.model_parameters(model)
            if key in own:
                value = evaluate_setting(own[key], tensor_name, t)
                if value is not None:
                    return value
        if self.parameters and key in self.parameters:
            value = evaluate_setting(self.parameters[key], tensor_name, t)
            if value is not None:
                return value
        if default is REQUIRED:
            who = f" for model '{model}'" if model else ""
            raise TunekitError(
                f"{self.source}: missing required parameter '{key}'{who} (tensor {tensor_name})"
            )
        return default

    def to_mergekit_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"source"})


def validate_config(raw: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping against the supported mergekit schema; TunekitError names the bad
    key."""
    if not isinstance(raw, dict):
        raise TunekitError(f"{source}: a merge config must be a YAML mapping")
    for key in raw:
        if key not in SUPPORTED_KEYS:
            hint = {
                "slices": "layer slicing (passthrough/frankenmerges) is not supported; use 'models'",
                "modules": "per-module merges are not supported; use 'models'",
                "tokenizer": "the 'tokenizer' block (union vocabularies, added tokens) is not supported; "
                "use tokenizer_source: base or a model path",
                "chat_template": "chat_template is not supported; edit tokenizer_config.json of the result",
            }.get(key, f"supported keys: {', '.join(SUPPORTED_KEYS)}")
            raise TunekitError(f"{source}: unsupported key '{key}' ({hint})")
    if "models" not in raw:
        raise TunekitError(f"{source}: missing key 'models'")
    if isinstance(raw.get("models"), list):
        for i, m in enumerate(raw["models"]):
            if isinstance(m, dict):
                bad = set(m) - {"model", "parameters"}
                if bad:
                    raise TunekitError(f"{source}: models[{i}]: unsupported key '{sorted(bad)[0]}'")
    try:
        cfg = MergeConfig(**raw, source=source)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise TunekitError(f"{source}: key '{loc}': {err['msg']}") from None

    method = cfg.merge_method
    if method != ADAPTER_SUM and method not in METHODS:
        raise TunekitError(
            f"{source}: merge_method '{method}' is not supported "
            f"(supported: {', '.join(sorted([*METHODS, ADAPTER_SUM]))})"
        )
    if not cfg.models:
        raise TunekitError(f"{source}: 'models' is empty")
    seen = set()
    for m in cfg.models:
        if m.model in seen:
            raise TunekitError(f"{source}: model '{m.model}' is listed twice")
        seen.add(m.model)
    for name in (cfg.dtype, cfg.out_dtype):
        normalize_dtype(name, where=f"{source}: dtype")
    if cfg.tokenizer_source not in (None, "base") and cfg.tokenizer_source not in cfg.model_names():
        if cfg.tokenizer_source == "union":
            raise TunekitError(f"{source}: tokenizer_source 'union' is not supported (use 'base' or a model)")
        ts = cfg.tokenizer_source.removeprefix("model:")
        if ts not in cfg.model_names():
            raise TunekitError(
                f"{source}: tokenizer_source '{cfg.tokenizer_source}' is not one of the models"
            )
        cfg.tokenizer_source = ts

    if method == ADAPTER_SUM:
        allowed_global: dict[str, Any] = {}
        allowed_tensor: dict[str, Any] = {"weight": REQUIRED}
    else:
        spec = METHODS[method]
        allowed_global = {**spec.global_params, **EMBED_PARAMS}
        allowed_tensor = spec.tensor_params
    for key, value in (cfg.parameters or {}).items():
        if key not in allowed_global and key not in allowed_tensor:
            raise TunekitError(
                f"{source}: parameter '{key}' is not used by merge_method '{method}' "
                f"(it takes: {', '.join([*allowed_global, *allowed_tensor]) or 'none'})"
            )
        _check_setting(key, value, source)
    for i, m in enumerate(cfg.models):
        for key, value in (m.parameters or {}).items():
            if key not in allowed_tensor:
                raise TunekitError(
                    f"{source}: models[{i}] ({m.model}): parameter '{key}' is not a per-model parameter of "
                    f"'{method}' (per-model: {', '.join(allowed_tensor) or 'none'})"
                )
            _check_setting(key, value, source)

    if method == "slerp":
        names = cfg.model_names()
        if len(names) != 2:
            raise TunekitError(
                f"{source}: slerp merges exactly two models (base_model included), got {len(names)}"
            )
        if cfg.base_model is None:
            raise TunekitError(f"{source}: slerp needs base_model (the t=0 endpoint)")
    if method in METHODS and METHODS[method].needs_base and cfg.base_model is None:
        raise TunekitError(
            f"{source}: merge_method '{method}' needs base_model (task vectors are relative to it)"
        )
    if method == "linear" and cfg.base_model and cfg.base_model not in [m.model for m in cfg.models]:
        raise TunekitError(f"{source}: linear: base_model '{cfg.base_model}' must also be listed in models")
    return cfg


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit-style YAML file."""
    from tunekit.config.load import read_yaml_file  # refuses alias bombs, recursive aliases, nan/inf

    raw = read_yaml_file(path, "config")
    if isinstance(raw, dict) and "trust_remote_code" in raw:
        from tunekit.run.locate import untrusted

        raw = untrusted(raw, Path(path))
    return validate_config(raw, source=str(path))
