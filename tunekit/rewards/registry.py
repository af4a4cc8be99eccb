"""One registry of reward functions: name -> factory(**params) -> reward function in TRL's calling convention.

A reward function is called as `fn(prompts=..., completions=..., completion_ids=..., **columns)` (every other
dataset column as a list, plus TRL's `trainer_state`, `log_extra`, `log_metric`) and returns one float or None
per completion (None = not applicable; TRL and `score` then count it as 0 in the weighted sum). Its `__name__`
names the reward in logs (`rewards/<name>/mean`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunekit.errors import TunekitError

if TYPE_CHECKING:
    import numpy as np

RewardFunc = Callable[..., list]
_FACTORIES: dict[str, Callable[..., RewardFunc]] = {}
_BUILTIN_MODULES = ("answers", "formatting", "length", "code_tests", "reward_model")
PYTHON_PREFIX = "python:"


def register_reward(name: str) -> Callable[[Callable[..., RewardFunc]], Callable[..., RewardFunc]]:
    """Decorator: register `factory(**params) -> reward function` under `name`."""

    def wrap(factory: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"tunekit.rewards.{module}")


def reward_names() -> list[str]:
    """Names of the built-in rewards."""
    _load_builtins()
    return sorted(_FACTORIES)


def _factory(name: str) -> Callable[..., RewardFunc]:
    _load_builtins()
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, list(_FACTORIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TunekitError(
            f"unknown reward '{name}'{hint}; built-in: {', '.join(sorted(_FACTORIES))}, "
            "or python:package.module:function"
        )
    return _FACTORIES[name]


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise TunekitError when a built-in reward does not take one of `params` (nothing is built or imported
    for `python:` rewards)."""
    if name.startswith(PYTHON_PREFIX):
        _split_python_spec(name)
        return
    factory = _factory(name)
    accepted = [p for p in inspect.signature(factory).parameters if not p.startswith("_")]
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TunekitError(
                f"reward '{name}': unknown parameter '{key}'{hint}; it takes: {', '.join(accepted) or 'nothing'}"
            )


def get_reward(name: str, **params: Any) -> RewardFunc:
    """Build the reward function `name` with its parameters (a built-in name or `python:module:function`)."""
    if name.startswith(PYTHON_PREFIX):
        return _python_reward(name, params)
    check_params(name, params)
    try:
        fn = _factory(name)(**params)
    except (TypeError, ValueError) as exc:
        raise TunekitError(f"reward '{name}': {exc}") from None
    return fn


def _split_python_spec(name: str) -> tuple[str, str]:
    target = name[len(PYTHON_PREFIX):]
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise TunekitError(f"reward '{name}': write a user reward as python:package.module:function")
    return module, attr


def _python_reward(name: str, params: dict[str, Any]) -> RewardFunc:
    """A user's own reward function, imported because the user named it in their recipe; `params` are passed to
    it as keyword arguments on every call."""
    import functools

    module_name, attr = _split_python_spec(name)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module: report it in one line
        raise TunekitError(f"reward '{name}': cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise TunekitError(f"reward '{name}': module {module_name} has no attribute '{attr}'")
    if not callable(fn):
        raise TunekitError(f"reward '{name}': {module_name}:{attr} is not callable")
    if not params:
        return fn
    bound = functools.partial(fn, **params)
    wrapper = functools.update_wrapper(lambda *a, **k: bound(*a, **k), fn)
    return wrapper


class RewardSpec(BaseModel):
    """The recipe's reward entry, `rewards: [{name: math_answer, weight: 1.0, column: answer}, ...]`: one weighted
    reward; every key besides `name` and `weight` is a parameter of that reward, checked against the registry."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description="A built-in reward (math_answer, format, length, code_tests, reward_model) or "
        "`python:package.module:function`."
    )
    weight: float = Field(1.0, allow_inf_nan=False,
                          description="Weight of this reward in the sum (GRPOConfig.reward_weights).")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_reward(self) -> RewardSpec:
        try:
            check_params(self.name, self.params)
        except TunekitError as exc:
            raise ValueError(str(exc)) from None
        return self


def checked_reward(fn: RewardFunc, label: str) -> RewardFunc:
    """`fn` with its contract enforced on every call, so a broken reward is named instead of failing deep in a
    trainer as an internal error: it must return a list of one value per completion, each a finite number, or
    None / NaN ("not applicable", counted as 0 as TRL does). An exception it raises is reported as the user's
    error with the reward's name (e.g. python:my_rewards:score) and the exception's first line."""
    import functools

    import numpy as np

    def call(*args: Any, **kwargs: Any) -> list[float | None]:
        completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
        try:
            out = fn(*args, **kwargs)
        except TunekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reward's own failure: one line naming it
            first = (str(exc).splitlines() or [""])[0][:200]
            raise TunekitError(f"reward '{label}' raised {type(exc).__name__}: {first}") from None
        if isinstance(out, (str, bytes)) or not isinstance(out, (Sequence, np.ndarray)):
            raise TunekitError(f"reward '{label}' returned {type(out).__name__}; it must return a list with one "
                               "number (or None) per completion")
        if completions is not None and len(out) != len(completions):
            raise TunekitError(f"reward '{label}' returned {len(out)} values for {len(completions)} completions")
        for value in out:
            if value is None:
                continue
            try:
                number = None if isinstance(value, (str, bytes)) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None:
                raise TunekitError(f"reward '{label}' returned a {type(value).__name__} ({str(value)[:40]!r}); "
                                   "rewards must be numbers (or None when not applicable)")
            if math.isinf(number):
                raise TunekitError(f"reward '{label}' returned {number}; rewards must be finite (None or NaN "
                                   "= not applicable)")
        return list(out)

    functools.update_wrapper(call, fn)
    return call


@dataclass
class RewardScores:
    """Each reward's values as it returned them (None = not applicable) and the weighted total
    Σ_i w_i r_i with None counted as 0, as TRL's GRPOTrainer does with nansum."""

    per_reward: dict[str, list[float | None]]
    weights: dict[str, float]
    total: np.ndarray

    def means(self) -> dict[str, float | None]:
        """`rewards/<name>/mean` over the values that are not None (None when there are none), and `reward`."""
        out: dict[str, float | None] = {}
        for name, values in self.per_reward.items():
            vals = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = sum(vals) / len(vals) if vals else None
        out["reward"] = float(self.total.mean()) if len(self.total) else None
        return out


class RewardSet:
    """Built reward functions with their weights and unique names (a second `format` is `format_2`)."""

    def __init__(self, funcs: Sequence[RewardFunc], weights: Sequence[float]) -> None:
        if len(funcs) != len(weights):
            raise ValueError("one weight per reward function")
        self.funcs = list(funcs)
        self.weights = [float(w) for w in weights]
        self.names = _unique_names(self.funcs)

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec | dict]) -> RewardSet:
        from pydantic import ValidationError

        funcs, weights = [], []
        for i, spec in enumerate(specs):
            try:
                spec = spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)
            except ValidationError as exc:
                raise TunekitError(f"rewards[{i}]: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
            try:
                funcs.append(checked_reward(get_reward(spec.name, **spec.params), spec.name))
            except TunekitError as exc:
                raise TunekitError(f"rewards[{i}]: {exc}") from None
            if not math.isfinite(spec.weight):
                raise TunekitError(f"rewards[{i}] ({spec.name}): weight must be a finite number, got {spec.weight}")
            weights.append(spec.weight)
        if not funcs:
            raise TunekitError("no rewards: add `rewards: [{name: math_answer}]` to the recipe")
        return cls(funcs, weights)

    def required_columns(self) -> dict[str, tuple[str, ...]]:
        """The data columns each reward reads ({} entries for rewards that read none)."""
        return {name: tuple(getattr(fn, "columns", ())) for name, fn in zip(self.names, self.funcs)}

    def check_columns(self, available: Sequence[str]) -> None:
        """Raise TunekitError before training when a reward reads a column the data lacks."""
        have = set(available)
        for name, columns in self.required_columns().items():
            for column in columns:
                if column not in have:
                    found = ", ".join(sorted(have)) or "none besides the prompt"
                    raise TunekitError(f"reward '{name}' reads the column '{column}', which the data lacks "
                                       f"(columns: {found}); set `column:` in the reward or add it to the records")

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: dict[str, Sequence[Any]] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
    ) -> RewardScores:
        """Call every reward as GRPOTrainer would; total = Σ_i w_i r_i with None/NaN counted as 0."""
        import numpy as np

        n = len(completions)
        kwargs = {k: list(v) for k, v in (columns or {}).items() if k not in ("prompts", "completions")}
        for key, value in kwargs.items():
            if len(value) != n:
                raise ValueError(f"column '{key}' has {len(value)} values for {n} completions")
        per: dict[str, list[float | None]] = {}
        total = np.zeros(n, dtype=np.float64)
        for name, fn, w in zip(self.names, self.funcs, self.weights):
            out = fn(prompts=list(prompts), completions=list(completions),
                     completion_ids=None if completion_ids is None else list(completion_ids),
                     trainer_state=None, **kwargs)
            values = [None if v is None or v != v else float(v) for v in out]  # NaN is "not applicable" too
            if len(values) != n:
                raise ValueError(f"reward '{name}' returned {len(values)} values for {n} completions")
            per[name] = values
            total += w * np.array([0.0 if v is None else v for v in values], dtype=np.float64)
        return RewardScores(per, dict(zip(self.names, self.weights)), total)


def _unique_names(funcs: Sequence[RewardFunc]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for fn in funcs:
        base = getattr(fn, "__name__", None) or type(fn).__name__
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        if name != base:
            try:
                fn.__name__ = name
            except (AttributeError, TypeError):
                pass
        names.append(name)
    return names


def combine(specs: Sequence[RewardSpec | dict]) -> tuple[list[RewardFunc], list[float]]:
    """(reward functions, weights) for `GRPOTrainer(reward_funcs=...)` and `GRPOConfig(reward_weights=...)`."""
    rs = RewardSet.from_specs(specs)
    return rs.funcs, rs.weights


def score(
    specs: Sequence[RewardSpec | dict] | RewardSet,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> RewardScores:
    """Score completions outside a trainer (PPO, eval): per-reward arrays and the weighted total."""
    rs = specs if isinstance(specs, RewardSet) else RewardSet.from_specs(specs)
    return rs.score(prompts, completions, columns, completion_ids)
