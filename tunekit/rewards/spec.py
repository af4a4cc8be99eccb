"""The recipe's reward entry: `rewards: [{name: math_answer, weight: 1.0, column: answer}, ...]`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RewardSpec(BaseModel):
    """One weighted reward; every key besides `name` and `weight` is a parameter of that reward."""

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
        from tunekit.errors import TunekitError
        from tunekit.rewards.registry import check_params

        try:
            check_params(self.name, self.params)
        except TunekitError as exc:
            raise ValueError(str(exc)) from None
        return self
