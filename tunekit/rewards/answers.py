"""`math_answer`: 1.0 when the completion's final number equals the record's answer, else 0.0.

The final answer is the number after the last `####` (GSM8K, Cobbe et al., 2021), else inside the last
`\\boxed{...}` (MATH, Hendrycks et al., 2021), else inside the last `<answer>...</answer>`, else the last number
in the text. Numbers may carry signs, thousands separators (1,234), decimals, fractions (3/4, \\frac{3}{4}) and
units ($, %). Correct means |a − b| ≤ max(tolerance·|b|, abs_tolerance).

That fast numeric path decides only when it finds the two numbers equal (exact for the numbers it reads). Every
other case goes to Hugging Face's math-verify (the checker of TRL's accuracy reward and open-r1): LaTeX,
fractions, radicals (√2/2 = 1/√2), sets, intervals and symbolic equivalence, so rewards agree with
what is reported on GSM8K/MATH. A reference that is no number (a set, an interval, an expression) is checked by
math-verify alone.
"""

from __future__ import annotations

import math
import re
import threading
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


def _gold_text(value: Any) -> str:
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().splitlines()[0] if text.rsplit("####", 1)[1].strip() else ""
    return text.strip()


def _plain_number(reference: Any) -> bool:
    """The reference is one number (int, float, "1,234", "#### 72", "3/4", "\\frac{3}{4}"), not a set, an
    interval or an expression: only then may the fast path decide."""
    if isinstance(reference, (int, float)):
        return True
    m = _NUMBER.fullmatch(_normalise(_gold_text(reference)).strip().rstrip("%").strip())
    return m is not None and (m.group("int") is not None or m.group("frac") is not None)


def verified_match(completion: str, reference: Any) -> bool:
    """math-verify's verdict: the completion's final answer equals the reference up to mathematical
    equivalence. Its signal-based timeouts work only in the main thread; elsewhere they are off."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_text = _gold_text(reference)
    if not gold_text:
        return False
    wrapped = gold_text if ("$" in gold_text or "\\boxed" in gold_text) else f"${gold_text}$"
    gold = parse(wrapped, parsing_timeout=timeout) or parse(gold_text, parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def answer_correct(completion: str, reference: Any, tolerance: float = 1e-6, abs_tolerance: float = 1e-9,
                   last_number: bool = True) -> bool | None:
    """True/False for a completion against a record's answer (None: the record has no answer). Equal numbers
    on the fast path are correct; anything else is math-verify's call."""
    if reference is None or isinstance(reference, bool) or (isinstance(reference, str) and not reference.strip()):
        return None
    expected = reference_answer(reference) if _plain_number(reference) else None
    got = extract_answer(completion, last_number=last_number) if expected is not None else None
    if got is not None and answers_match(got, expected, tolerance, abs_tolerance):
        return True
    if not last_number and "####" not in completion and "\\boxed" not in completion:
        return False
    if isinstance(reference, (int, float)):
        reference = repr(reference)
    return verified_match(completion, reference)


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
            ok = answer_correct(completion_text(completion), ref, tolerance, abs_tolerance, last_number)
            out.append(None if ok is None else float(ok))
        return out

    reward.__name__ = "math_answer"
    reward.columns = (column,)
    return reward
