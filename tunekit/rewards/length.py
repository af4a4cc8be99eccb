"""`length`: 0 inside a target range [min, max] of tokens or characters, a linear penalty outside it:
r = −slope · (min − n) below, −slope · (n − max) above, floored at `floor` (cf. the overlong penalty of DAPO,
Yu et al., 2025)."""

from __future__ import annotations

from tunekit.rewards.registry import register_reward
from tunekit.rewards.text import completion_text


def length_penalty(n: float, low: float | None, high: float | None, slope: float, floor: float | None) -> float:
    if low is not None and n < low:
        r = -slope * (low - n)
    elif high is not None and n > high:
        r = -slope * (n - high)
    else:
        return 0.0
    return max(r, floor) if floor is not None else r


@register_reward("length")
def length_reward(min: int | None = None, max: int | None = None, unit: str = "tokens",  # noqa: A002
                  slope: float | None = None, floor: float | None = -1.0):
    """Build the reward. `slope` defaults to 1/max (1/min without a max): a completion twice too long costs 1.
    Tokens are counted from TRL's `completion_ids`; `unit: chars` counts characters of the text."""
    if min is None and max is None:
        raise ValueError("give `min`, `max` or both")
    import math

    for key, value in (("min", min), ("max", max), ("slope", slope), ("floor", floor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if (min is not None and min < 0) or (max is not None and max < 0):
        raise ValueError("min and max must be >= 0")
    if min is not None and max is not None and min > max:
        raise ValueError(f"min ({min}) is larger than max ({max})")
    if unit not in ("tokens", "chars"):
        raise ValueError(f"unit must be tokens or chars, not '{unit}'")
    scale = slope if slope is not None else 1.0 / float(max if max else min or 1)
    if scale < 0:
        raise ValueError("slope must be >= 0")

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        if unit == "tokens":
            if completion_ids is None:
                raise ValueError("length: unit tokens needs completion_ids (or use unit: chars)")
            sizes = [len(ids) for ids in completion_ids]
        else:
            sizes = [len(completion_text(c)) for c in completions]
        return [length_penalty(n, min, max, scale, floor) for n in sizes]

    reward.__name__ = "length"
    return reward
