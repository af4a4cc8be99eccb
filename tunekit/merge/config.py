"""mergekit's YAML merge-config schema (the subset tunekit supports), validated strictly.

Top-level keys: merge_method, base_model, either `models` (each: model, parameters) or `slices` (each:
sources [{model, layer_range, parameters}], base_model, parameters), parameters, dtype, out_dtype,
tokenizer_source ('base', 'union' or a model) or a `tokenizer:` block (source, tokens, pad_to_multiple_of),
chat_template. Model references may be local folders, tunekit aliases, hub ids (`org/name[@revision]`, read
from the hub cache) or `model+adapter` (the adapter is folded while streaming).
Parameter values may be scalars, gradients (a list of numbers interpolated over the layer index) or
conditional lists `[{filter: self_attn, value: ...}, {value: ...}]`, evaluated exactly as mergekit does: the
slice source's (or model's) own parameter wins, then the slice's, then the top-level one, then the default;
the first entry whose `filter` is a substring of the tensor name (or has no filter / '*') applies.
Anything else (`modules`, unknown parameters, ...) is a TunekitError naming the key.
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
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
ADAPTER_SUM = "adapter_sum"
#: Older mergekit configs set `embed_slerp`; mergekit 0.1.5 accepts and ignores it (the method merges aligned
#: embeddings), and so does tunekit.
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
        if not (isinstance(inner, scalar) or (isinstance(inner, list) and all(isinstance(e, scalar) for e in inner))):
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


def _model_ref(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a model path (string)")
    return v


class InputModel(_Strict):
    model: str
    parameters: dict[str, Any] | None = None

    _check_model = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))


class InputSlice(_Strict):
    """One source of an output slice: layers [start, end) of `model` (None: all layers, the `models:` form)."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] | None = None

    _check_model = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None


class TokenEmbedding(_Strict):
    """Where a token's embedding comes from: a model (its row for this token), a model's given token, or zeros."""

    source: str | dict[str, Any] | None = None
    force: bool = False


class TokenizerBlock(_Strict):
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(_Strict):
    """A mergekit merge configuration (supported subset). `source` is the file it came from, for messages."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    source: str = "config"

    def model_names(self) -> list[str]:
        """Every referenced model, in order of appearance, base last if not listed elsewhere."""
        names: list[str] = []
        if self.models:
            names = [m.model for m in self.models]
        for sl in self.slices or []:
            for src in sl.sources:
                if src.model not in names:
                    names.append(src.model)
            if sl.base_model and sl.base_model not in names:
                names.append(sl.base_model)
        if self.base_model and self.base_model not in names:
            names.append(self.base_model)
        return names

    def output_slices(self) -> list[OutputSlice]:
        """The config as mergekit plans it: `models:` is one slice over all layers of every model (base added)."""
        if self.slices:
            return self.slices
        sources = [InputSlice(model=m.model, parameters=m.parameters) for m in self.models or []]
        if self.base_model and self.base_model not in [m.model for m in self.models or []]:
            sources.append(InputSlice(model=self.base_model))
        return [OutputSlice(sources=sources)]

    def tokenizer_plan(self) -> TokenizerBlock | None:
        """`tokenizer_source` / `tokenizer:` as one block (source 'base', 'union' or a model), None if neither."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None:
            return TokenizerBlock(source=self.tokenizer_source)
        return None

    def model_parameters(self, name: str) -> dict[str, Any]:
        for m in self.models or []:
            if m.model == name:
                return m.parameters or {}
        return {}

    def parameter(
        self,
        key: str,
        model: str | None,
        tensor_name: str,
        t: float,
        default: Any = REQUIRED,
        out_slice: OutputSlice | None = None,
    ) -> Any:
        """mergekit's lookup order: the slice source's (or model's) own parameter, the slice's, the global one,
        then `default`."""
        layers: list[dict[str, Any]] = []
        if out_slice is not None and self.slices:
            if model is not None:
                layers += [src.parameters or {} for src in out_slice.sources if src.model == model]
            layers.append(out_slice.parameters or {})
        elif model is not None:
            layers.append(self.model_parameters(model))
        layers.append(self.parameters or {})
        for settings in layers:
            if key in settings:
                value = evaluate_setting(settings[key], tensor_name, t)
                if value is not None:
                    return value
        if default is REQUIRED:
            who = f" for model '{model}'" if model else ""
            raise TunekitError(f"{self.source}: missing required parameter '{key}'{who} (tensor {tensor_name})")
        return default

    def to_mergekit_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"source"})


def _first_error(exc: ValidationError, source: str, prefix: str = "") -> TunekitError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return TunekitError(f"{source}: key '{prefix}{loc}': {err['msg']}")


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(raw) - allowed)
    if bad:
        raise TunekitError(f"{where}: unsupported key '{bad[0]}' (supported: {', '.join(sorted(allowed))})")


def _validate_structure(raw: dict, source: str) -> None:
    """Key-level checks with mergekit's wording for the common mistakes, before pydantic sees the mapping."""
    for key in raw:
        if key not in SUPPORTED_KEYS:
            hint = {
                "modules": "per-module merges are not supported; use 'models' or 'slices'",
            }.get(key, f"supported keys: {', '.join(SUPPORTED_KEYS)}")
            raise TunekitError(f"{source}: unsupported key '{key}' ({hint})")
    given = [k for k in ("models", "slices") if raw.get(k)]
    if len(given) != 1:
        if "models" in raw and not raw["models"] and not raw.get("slices"):
            raise TunekitError(f"{source}: 'models' is empty")
        raise TunekitError(f"{source}: exactly one of 'models' or 'slices' must be given (got {given or 'neither'})")
    if isinstance(raw.get("models"), list):
        for i, m in enumerate(raw["models"]):
            if isinstance(m, dict):
                _check_keys(m, {"model", "parameters"}, f"{source}: models[{i}]")
    if isinstance(raw.get("slices"), list):
        for i, sl in enumerate(raw["slices"]):
            if not isinstance(sl, dict):
                raise TunekitError(f"{source}: slices[{i}] must be a mapping with 'sources'")
            _check_keys(sl, {"sources", "base_model", "parameters"}, f"{source}: slices[{i}]")
            if not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise TunekitError(f"{source}: slices[{i}]: 'sources' must be a non-empty list")
            for j, src in enumerate(sl["sources"]):
                where = f"{source}: slices[{i}].sources[{j}]"
                if not isinstance(src, dict):
                    raise TunekitError(f"{where} must be a mapping with 'model' and 'layer_range'")
                _check_keys(src, {"model", "layer_range", "parameters"}, where)
                lr = src.get("layer_range")
                if (
                    not isinstance(lr, list)
                    or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                ):
                    raise TunekitError(f"{where}: 'layer_range' must be [start, end] (two integers), got {lr!r}")
                if not 0 <= lr[0] < lr[1]:
                    raise TunekitError(f"{where}: layer_range {lr} is empty or negative (need 0 <= start < end)")
    if isinstance(raw.get("tokenizer"), dict):
        _check_keys(raw["tokenizer"], {"source", "tokens", "pad_to_multiple_of"}, f"{source}: tokenizer")
        if raw.get("tokenizer_source") is not None:
            raise TunekitError(f"{source}: give either 'tokenizer_source' or a 'tokenizer' block, not both")


def _check_params(
    cfg: MergeConfig, settings: dict[str, Any] | None, allowed: dict[str, Any], where: str, what: str
) -> None:
    for key, value in (settings or {}).items():
        if key not in allowed:
            raise TunekitError(
                f"{where}: parameter '{key}' is not {what} '{cfg.merge_method}' "
                f"(it takes: {', '.join(allowed) or 'none'})"
            )
        _check_setting(key, value, cfg.source)


def _normalize_tokenizer(cfg: MergeConfig) -> None:
    source = cfg.source
    names = cfg.model_names()

    def model_of(value: str, where: str) -> str:
        name = value.removeprefix("model:")
        if name not in names:
            raise TunekitError(f"{source}: {where} '{value}' is not one of the models")
        return name

    if cfg.tokenizer_source is not None and cfg.tokenizer_source not in ("base", "union"):
        cfg.tokenizer_source = model_of(cfg.tokenizer_source, "tokenizer_source")
    block = cfg.tokenizer
    if block is None:
        return
    if block.source not in ("base", "union"):
        block.source = model_of(block.source, "tokenizer.source")
    if block.pad_to_multiple_of is not None and block.pad_to_multiple_of <= 0:
        raise TunekitError(f"{source}: tokenizer.pad_to_multiple_of must be a positive integer")
    for token, emb in (block.tokens or {}).items():
        where = f"tokenizer.tokens['{token}'].source"
        src = emb.source
        if src is None:
            continue
        if isinstance(src, str):
            emb.source = model_of(src, where)
            continue
        kind = src.get("kind")
        if kind == "zero":
            _check_keys(src, {"kind"}, f"{source}: {where}")
        elif kind == "model_token":
            _check_keys(src, {"kind", "model", "token_id", "token"}, f"{source}: {where}")
            if (src.get("token_id") is None) == (src.get("token") is None):
                raise TunekitError(f"{source}: {where}: give exactly one of 'token_id' or 'token'")
            if src.get("token_id") is not None and not isinstance(src["token_id"], int):
                raise TunekitError(f"{source}: {where}: token_id must be an integer")
            src["model"] = model_of(str(src.get("model")), where)
        else:
            raise TunekitError(f"{source}: {where}: kind must be 'model_token' or 'zero', got {kind!r}")


def validate_config(raw: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping against the supported mergekit schema; TunekitError names the bad
    key."""
    if not isinstance(raw, dict):
        raise TunekitError(f"{source}: a merge config must be a YAML mapping")
    _validate_structure(raw, source)
    try:
        cfg = MergeConfig(**raw, source=source)
    except ValidationError as exc:
        raise _first_error(exc, source) from None

    method = cfg.merge_method
    if method != ADAPTER_SUM and method not in METHODS:
        raise TunekitError(
            f"{source}: merge_method '{method}' is not supported "
            f"(supported: {', '.join(sorted([*METHODS, ADAPTER_SUM]))})"
        )
    if cfg.slices and method == ADAPTER_SUM:
        raise TunekitError(f"{source}: adapter_sum takes 'models' (adapters), not 'slices'")
    for m_list, label in ((cfg.models or [], "models"),):
        seen = set()
        for m in m_list:
            if m.model in seen:
                raise TunekitError(f"{source}: model '{m.model}' is listed twice in '{label}'")
            seen.add(m.model)
    for i, sl in enumerate(cfg.slices or []):
        seen = set()
        for src in sl.sources:
            if src.model in seen:
                raise TunekitError(f"{source}: slices[{i}]: model '{src.model}' is listed twice")
            seen.add(src.model)
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources if src.layer_range}
        if len(lengths) > 1:
            raise TunekitError(
                f"{source}: slices[{i}]: every source must span the same number of layers, got "
                + ", ".join(f"{src.model} {list(src.layer_range or ())}" for src in sl.sources)
            )
    for name in (cfg.dtype, cfg.out_dtype):
        normalize_dtype(name, where=f"{source}: dtype")
    _normalize_tokenizer(cfg)
    if cfg.chat_template is not None:
        from tunekit.merge.tokenizer import check_chat_template

        check_chat_template(cfg.chat_template, source)

    if method == ADAPTER_SUM:
        allowed_global: dict[str, Any] = {}
        allowed_tensor: dict[str, Any] = {"weight": REQUIRED}
    else:
        spec = METHODS[method]
        allowed_global = {**spec.global_params, **EMBED_PARAMS}
        allowed_tensor = spec.tensor_params
    _check_params(cfg, cfg.parameters, {**allowed_global, **allowed_tensor}, source, "used by merge_method")
    for i, m in enumerate(cfg.models or []):
        _check_params(
            cfg, m.parameters, allowed_tensor, f"{source}: models[{i}] ({m.model})", "a per-model parameter of"
        )
    for i, sl in enumerate(cfg.slices or []):
        _check_params(
            cfg, sl.parameters, {**allowed_global, **allowed_tensor}, f"{source}: slices[{i}]", "used by merge_method"
        )
        for j, src in enumerate(sl.sources):
            _check_params(
                cfg,
                src.parameters,
                allowed_tensor,
                f"{source}: slices[{i}].sources[{j}] ({src.model})",
                "a per-model parameter of",
            )

    if method == ADAPTER_SUM:
        return cfg
    spec = METHODS[method]
    for i, sl in enumerate(cfg.output_slices()):
        where = f"{source}: slices[{i}]: " if cfg.slices else f"{source}: "
        base = sl.base_model or cfg.base_model
        models = [src.model for src in sl.sources]
        if spec.needs_base and base is None:
            raise TunekitError(f"{where}merge_method '{method}' needs base_model (task vectors are relative to it)")
        if method == "slerp" and base is None:
            raise TunekitError(f"{where}slerp needs base_model (the t=0 endpoint)")
        if spec.base_is_special and base is not None and base not in models:
            raise TunekitError(f"{where}base_model '{base}' is not one of this slice's sources")
        why = spec.check_inputs(len(models), base is not None and base in models)
        if why:
            raise TunekitError(f"{where}{why}")
    if method == "linear" and cfg.models and cfg.base_model and cfg.base_model not in [m.model for m in cfg.models]:
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
