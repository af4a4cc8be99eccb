"""Warnings for runaway training signals, fed once per step by GRPO/PPO callbacks: completion length growing
away from its start (or most completions truncated), and one reward taking over the weighted sum — both common
signs of reward hacking.

share_i = |w_i · m_i| / Σ_j |w_j · m_j| with m_i the mean of reward i over the last `window` steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RewardTracker:
    """`update(...)` / `update_from_logs(...)` return new warnings (each condition warns once, and again only after
    it cleared)."""

    window: int = 10
    length_growth: float = 2.0
    truncation_share: float = 0.5
    max_share: float = 0.8
    max_completion_length: int | None = None
    _lengths: deque = field(default_factory=deque, init=False, repr=False)
    _truncated: deque = field(default_factory=deque, init=False, repr=False)
    _rewards: dict = field(default_factory=dict, init=False, repr=False)
    _baseline_length: float | None = field(default=None, init=False)
    _baseline_share: dict = field(default_factory=dict, init=False)
    _first: list = field(default_factory=list, init=False, repr=False)
    _active: set = field(default_factory=set, init=False)
    steps: int = field(default=0, init=False)

    def update(self, lengths: Sequence[int], rewards: dict[str, Sequence[float | None]] | None = None,
               weights: dict[str, float] | None = None, step: int | None = None) -> list[str]:
        """Feed one step: completion lengths (tokens) and each reward's values for that step's completions."""
        mean_len = sum(lengths) / len(lengths) if lengths else 0.0
        cut = None
        if self.max_completion_length:
            cut = sum(1 for n in lengths if n >= self.max_completion_length) / max(1, len(lengths))
        means = {}
        for name, values in (rewards or {}).items():
            vals = [float(v) for v in values if v is not None and v == v]
            means[name] = sum(vals) / len(vals) if vals else 0.0
        return self._step(mean_len, cut, means, weights, step)

    def update_from_logs(self, logs: dict[str, float], weights: dict[str, float] | None = None,
                         step: int | None = None) -> list[str]:
        """Feed one step from GRPOTrainer's logged metrics (`completions/mean_length`,
        `completions/clipped_ratio`, `rewards/<name>/mean`), e.g. in a TrainerCallback's on_log."""
        if "completions/mean_length" not in logs:
            return []
        means = {k[len("rewards/"):-len("/mean")]: float(v) for k, v in logs.items()
                 if k.startswith("rewards/") and k.endswith("/mean") and v is not None}  # None: not applicable
        cut = logs.get("completions/clipped_ratio")
        return self._step(float(logs["completions/mean_length"]), None if cut is None else float(cut), means,
                          weights, step)

    def _step(self, mean_len: float, cut: float | None, means: dict[str, float],
              weights: dict[str, float] | None, step: int | None) -> list[str]:
        self.steps += 1
        at = f"step {step if step is not None else self.steps}"
        warnings: list[str] = []
        self._push(self._lengths, mean_len)
        if cut is not None:
            self._push(self._truncated, cut)
        for name, mean in means.items():
            self._push(self._rewards.setdefault(name, deque()), mean)
        if len(self._first) < self.window:
            self._first.append(mean_len)
            if len(self._first) == self.window:
                self._baseline_length = sum(self._first) / len(self._first)
                self._baseline_share = self.shares(weights)
            return warnings
        recent = sum(self._lengths) / len(self._lengths)
        base = self._baseline_length or 0.0
        grown = base > 0 and recent >= self.length_growth * base
        warnings += self._edge("length", grown, f"{at}: mean completion length {recent:.0f} tokens is "
                               f"{recent / base if base else 0:.1f}x its start ({base:.0f}); check samples for "
                               "padding or repetition that a reward pays for")
        if self._truncated:
            cut_mean = sum(self._truncated) / len(self._truncated)
            limit = f" ({self.max_completion_length})" if self.max_completion_length else ""
            warnings += self._edge("truncated", cut_mean >= self.truncation_share, f"{at}: {cut_mean:.0%} of "
                                   f"completions hit max_completion_length{limit} over the last "
                                   f"{len(self._truncated)} steps")
        shares = self.shares(weights)
        if len(shares) >= 2:
            for name, share in shares.items():
                start = self._baseline_share.get(name)
                was = f" (was {start:.0%} at the start)" if start is not None else ""
                warnings += self._edge(f"share:{name}", share >= self.max_share,
                                       f"{at}: reward '{name}' makes {share:.0%} of the weighted reward{was}; "
                                       "the others barely steer training (reward hacking?)")
        return warnings

    def shares(self, weights: dict[str, float] | None = None) -> dict[str, float]:
        """Each reward's share of Σ|w_i · m_i| over the window."""
        weights = weights or {}
        parts = {name: abs(weights.get(name, 1.0) * (sum(v) / len(v))) for name, v in self._rewards.items() if v}
        total = sum(parts.values())
        return {name: (p / total if total > 0 else 0.0) for name, p in parts.items()}

    def _push(self, q: deque, value: float) -> None:
        q.append(value)
        while len(q) > self.window:
            q.popleft()

    def _edge(self, key: str, on: bool, message: str) -> list[str]:
        if on and key not in self._active:
            self._active.add(key)
            return [message]
        if not on:
            self._active.discard(key)
        return []

