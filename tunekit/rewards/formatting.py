"""`format`: 1.0 when the completion has the required shape — a regex, or a tag structure such as
`<think>...</think><answer>...</answer>` (DeepSeek-R1's format reward, DeepSeek-AI, 2025) — else 0.0.

With `partial: true` a tag structure earns (k / (n + 1)) for k of its n tags well formed (opened once, closed
once, in order) without the whole structure matching; the full structure earns 1.0.

With neither `pattern` nor `tags`, the R1 convention `tags: [think, answer]` is used (what users of TRL and
open-r1 expect), and the run's log says so.
"""

from __future__ import annotations

import re

from tunekit.rewards.registry import register_reward
from tunekit.rewards.text import completion_text

_MODES = ("fullmatch", "search", "match")
R1_TAGS = ["think", "answer"]


def tag_structure(tags: list[str]) -> re.Pattern[str]:
    """`<t1>…</t1>\\s*<t2>…</t2>…` with optional whitespace around, contents non-greedy and tag-free."""
    parts = [rf"<{re.escape(t)}>(?:(?!</?{re.escape(t)}>).)*?</{re.escape(t)}>" for t in tags]
    return re.compile(r"\s*" + r"\s*".join(parts) + r"\s*", re.DOTALL)


def tag_score(text: str, tags: list[str], pattern: re.Pattern[str], partial: bool) -> float:
    if pattern.fullmatch(text):
        return 1.0
    if not partial:
        return 0.0
    good = 0
    for t in tags:
        opens, closes = text.count(f"<{t}>"), text.count(f"</{t}>")
        if opens == 1 and closes == 1 and text.index(f"<{t}>") < text.index(f"</{t}>"):
            good += 1
    return good / (len(tags) + 1)


@register_reward("format")
def format_reward(pattern: str | None = None, mode: str = "fullmatch", tags: list[str] | None = None,
                  partial: bool = False, ignore_case: bool = False):
    """Build the reward from a `pattern` (matched with `mode`, `.` matching newlines) or a list of `tags`
    (default: the R1 convention [think, answer])."""
    if pattern is not None and tags is not None:
        raise ValueError("give one of `pattern` (a regex) or `tags` (e.g. [think, answer]), not both")
    if pattern is None and tags is None:
        import sys

        tags = list(R1_TAGS)
        print("note: reward format: no pattern or tags given; using the R1 convention "
              "<think>...</think><answer>...</answer> (tags: [think, answer])", file=sys.stderr)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, not '{mode}'")
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    if tags is not None:
        if isinstance(tags, str) or not tags or not all(isinstance(t, str) and re.fullmatch(r"[\w-]+", t)
                                                          for t in tags):
            raise ValueError("`tags` must be a list of tag names such as [think, answer]")
        structure = tag_structure(list(tags))

        def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
            return [tag_score(completion_text(c), list(tags), structure, partial) for c in completions]
    else:
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        match = getattr(regex, mode)

        def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
            return [1.0 if match(completion_text(c)) else 0.0 for c in completions]

    reward.__name__ = "format"
    return reward
