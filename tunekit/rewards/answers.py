"""`math_answer`: 1.0 when the completion's final number equals the record's answer, else 0.0.

The final answer is the number after the last `####` (GSM8K, Cobbe et al., 2021), else inside the last
`\\boxed{...}` (MATH, Hendrycks et al., 2021), else inside the last `<answer>...</answer>`, else the last number
in the text. Numbers may carry signs, thousands separators (1,234), decimals, fractions (3/4, \\frac{3}{4}) and
units ($, %). Correct means |a − b| ≤ max(tolerance·|b|, abs_tolerance).
"""

from __future__ import annotations

import math
import re
from typing import Any

from tunekit.errors import TunekitError
from tunekit.rewards.registry import register_reward
from tunekit.rewards.text import completion_text

_NUMBER = re.compile(
    r"""
    (?:(?<![\w.])(?P<sign>[-+\u2212]))?     # a sign, unless it is a binary minus (5-3)
    (?:\$\s*)?                              # a currency sign
    (?P<int>\d{1,3}(?:,\d{3})+|\d+)?        # 1,234 or 1234 (optional for .5)
    (?P<frac>\.\d+)?                        # .5
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?      # /4
    """,
    re.VERBOSE,
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")


def _normalise(text: str) -> str:
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    return text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\u2212", "-")


def numbers(text: str) -> list[float]:
    """Every number in `text`, in order, as floats (fractions divided out)."""
    out = []
    for m in _NUMBER.finditer(_normalise(text)):
        if m.group("int") is None and m.group("frac") is None:
            continue
        value = float((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
        if m.group("den") is not None:
            den = float(m.group("den"))
            if den == 0:
                continue
            value /= den
        if m.group("sign") in ("-", "\u2212"):
            value = -value
        out.append(value)
    return out


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(text: str, last_number: bool = True) -> float | None:
    """The final answer of a solution: after the last `####`, else the last `\\boxed{}`, else the last
    `<answer>` tag, else the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        found = numbers(tail[0]) if tail else []
        return found[0] if found else None
    boxed = _last_boxed(text)
    if boxed is not None:
        found = numbers(boxed)
        return found[0] if found else None
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        found = numbers(tagged[-1])
        return found[-1] if found else None
    if not last_number:
        return None
    found = numbers(text)
    return found[-1] if found else None


def reference_answer(value: Any) -> float | None:
    """A record's answer: a number, or a string such as "72" or a GSM8K solution ending in "#### 72"."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return extract_answer(str(value))


def answers_match(predicted: float | None, reference: float, tolerance: float = 1e-6,
                  abs_tolerance: float = 1e-9) -> bool:
    """|predicted − reference| ≤ max(tolerance·|reference|, abs_tolerance)."""
    if predicted is None or not math.isfinite(predicted):
        return False
    return math.isclose(predicted, reference, rel_tol=tolerance, abs_tol=abs_tolerance)


@register_reward("math_answer")
def math_answer(column: str = "answer", tolerance: float = 1e-6, abs_tolerance: float = 1e-9,
                last_number: bool = True):
    """Build the reward; `last_number: false` accepts only `####` or `\\boxed{}` answers."""
    if tolerance < 0 or abs_tolerance < 0:
        raise ValueError("tolerance and abs_tolerance must be >= 0")

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        if column not in columns:
            raise TunekitError(f"reward 'math_answer' reads the column '{column}', which the data lacks "
                               f"(set `column:` in the reward)")
        out: list[float | None] = []
        for completion, ref in zip(completions, columns[column]):
            expected = reference_answer(ref)
            if expected is None:
                out.append(None)
                continue
            got = extract_answer(completion_text(completion), last_number=last_number)
            out.append(1.0 if answers_match(got, expected, tolerance, abs_tolerance) else 0.0)
        return out

    reward.__name__ = "math_answer"
    reward.columns = (column,)
    return reward
