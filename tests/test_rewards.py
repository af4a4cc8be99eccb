"""The reward registry and the text rewards on hand-computed cases (no models, no sandbox)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from tunekit.errors import TunekitError
from tunekit.rewards import RewardSpec, RewardTracker, combine, get_reward, reward_names, score
from tunekit.rewards.answers import extract_answer, numbers
from tunekit.rewards.code_tests import extract_code

# What GRPOTrainer passes besides prompts/completions/completion_ids (trl 1.16 _calculate_rewards).
TRL_EXTRAS = {"trainer_state": None, "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}


def call(fn, completions, completion_ids=None, **columns):
    return fn(prompts=["q"] * len(completions), completions=completions, completion_ids=completion_ids,
              **columns, **TRL_EXTRAS)


def test_registry_names():
    assert reward_names() == ["code_tests", "format", "length", "math_answer", "reward_model"]
    for name in ("math_answer", "code_tests"):
        assert get_reward(name).__name__ == name


def test_numbers_parsing():
    assert numbers("1,234.5 and -2/4 and .5 then 5-3") == [1234.5, -0.5, 0.5, 5.0, 3.0]
    assert numbers(r"costs \$12.50, or 50\%; x = \frac{3}{4}; y=−7") == [12.5, 50.0, 0.75, -7.0]
    assert numbers("no digits here") == []
    assert numbers("1/0 is undefined") == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", 72.0),
        ("#### 1,234\nI checked it 3 times.", 1234.0),  # #### wins over a later number
        (r"so the answer is \boxed{\frac{3}{4}} (not 7)", 0.75),
        (r"\boxed{\text{\$}1{,}000}", 1000.0),
        ("She has -5 apples, then 12 more: 7", 7.0),
        ("it rose by 50%", 50.0),
        ("The answer is $12.50.", 12.5),
        ("<think>12 + 30 = 42, not 41</think><answer>42</answer> (checked in 2 ways)", 42.0),
        ("nothing numeric", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_answer_hand_cases():
    fn = get_reward("math_answer")
    completions = [
        "so #### 1,234",  # GSM8K reference below
        r"\boxed{\frac{3}{4}}",
        "It is -5 dollars",
        "costs $12.50 total",
        "50%",
        [{"role": "assistant", "content": "the answer is 7"}],  # conversational completion
        "5 - 3 = 2, so 3",
        "about 0.3333",
        "no answer",
        "42",
    ]
    answers = ["Add them up.\n#### 1234", 0.75, "-5", "12.5", 50, "8", 3, "1/3", "9", None]
    assert call(fn, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, None]
    loose = get_reward("math_answer", tolerance=1e-3)
    assert call(loose, ["about 0.3333"], answer=["1/3"]) == [1.0]  # |0.3333 - 1/3| = 3.3e-5 <= 1e-3 * 1/3
    strict = get_reward("math_answer", last_number=False, column="gold")
    assert call(strict, ["the answer is 42", "#### 42", r"\boxed{42}"], gold=[42, 42, 42]) == [0.0, 1.0, 1.0]
    with pytest.raises(TunekitError, match="reads the column 'answer', which the data lacks"):
        call(fn, ["1"], gold=[1])


def test_format_tags_and_regex():
    tags = get_reward("format", tags=["think", "answer"])
    part = get_reward("format", tags=["think", "answer"], partial=True)
    texts = [
        "<think>a\nb</think>\n<answer>42</answer>\n",
        "<think>a</think>",
        "<answer>b</answer><think>a</think>",
        "<think><think>x</think></think><answer>y</answer>",
        "plain text",
    ]
    assert call(tags, texts) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # partial: k of n=2 tags well formed over n + 1 = 3 checks
    assert call(part, texts) == pytest.approx([1.0, 1 / 3, 2 / 3, 1 / 3, 0.0])
    full = get_reward("format", pattern=r"\d+")
    search = get_reward("format", pattern=r"\d+", mode="search")
    assert call(full, ["123", "abc 12"]) == [1.0, 0.0]
    assert call(search, ["123", "abc 12", "abc"]) == [1.0, 1.0, 0.0]
    for bad in ({"pattern": "a", "tags": ["b"]}, {"pattern": "("}, {"pattern": "a", "mode": "any"},  # {}: R1 default
                {"tags": "think"}):
        with pytest.raises(TunekitError, match="reward 'format'"):
            get_reward("format", **bad)


def test_length_penalty_hand_cases():
    fn = get_reward("length", min=10, max=20, unit="chars")  # slope 1/20, floor -1
    assert call(fn, ["x" * 15, "x" * 30, "x" * 4, "x" * 100, "x" * 10, "x" * 20]) == pytest.approx(
        [0.0, -10 / 20, -6 / 20, -1.0, 0.0, 0.0]
    )
    tokens = get_reward("length", max=3, slope=0.25, floor=None)
    assert call(tokens, ["a", "b", "c"], completion_ids=[[1] * 5, [1] * 3, [1] * 13]) == [-0.5, 0.0, -2.5]
    with pytest.raises(ValueError, match="completion_ids"):
        call(tokens, ["a"])
    with pytest.raises(TunekitError, match="min \\(5\\) is larger than max"):
        get_reward("length", min=5, max=2)


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```\n```py\ny = 2\n```") == "y = 2\n"  # the python block wins
    assert extract_code("```bash\nls\n```") == "ls\n"
    assert extract_code("```python\ndef f(): return 2") == "def f(): return 2"  # truncated completion
    assert extract_code("def g(): pass") == "def g(): pass"


def test_spec_validation_messages():
    spec = RewardSpec(name="math_answer", weight=2.0, column="gold")
    assert spec.params == {"column": "gold"} and spec.weight == 2.0
    with pytest.raises(ValidationError, match="unknown reward 'math_answr' \\(did you mean 'math_answer'\\?\\)"):
        RewardSpec(name="math_answr")
    with pytest.raises(ValidationError, match="unknown parameter 'colum' \\(did you mean 'column'\\?\\)"):
        RewardSpec(name="math_answer", colum="x")
    with pytest.raises(ValidationError, match="python:package.module:function"):
        RewardSpec(name="python:nomodule")
    RewardSpec(name="python:surely_not_installed_mod:fn")  # validated without importing anything


def test_python_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def contains(prompts, completions, word='hello', **kw):\n"
        "    return [1.0 if word in c else 0.0 for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("python:my_rewards:contains", word="bye")
    assert fn.__name__ == "contains"
    assert call(fn, ["say bye", "hello"]) == [1.0, 0.0]
    with pytest.raises(TunekitError, match="is not callable"):
        get_reward("python:my_rewards:NOT_CALLABLE")
    with pytest.raises(TunekitError, match="has no attribute 'missing'"):
        get_reward("python:my_rewards:missing")
    with pytest.raises(TunekitError, match="cannot import no_such_module_xyz"):
        get_reward("python:no_such_module_xyz:f")


def test_combine_and_score_weighted_total():
    specs = [
        {"name": "math_answer", "weight": 1.0},
        {"name": "format", "weight": 0.5, "pattern": r".*####.*"},
        RewardSpec(name="format", weight=0.25, tags=["answer"]),
    ]
    funcs, weights = combine(specs)
    assert [f.__name__ for f in funcs] == ["math_answer", "format", "format_2"]
    assert weights == [1.0, 0.5, 0.25]
    completions = ["#### 3", "<answer>4</answer>", "5"]
    result = score(specs, ["p"] * 3, completions, {"answer": ["3", "4", None]})
    assert result.per_reward == {"math_answer": [1.0, 1.0, None], "format": [1.0, 0.0, 0.0],
                                 "format_2": [0.0, 1.0, 0.0]}
    # total = 1.0*math + 0.5*format + 0.25*format_2, None counted as 0 (TRL's nansum)
    np.testing.assert_allclose(result.total, [1.0 + 0.5, 1.0 + 0.25, 0.0])
    means = result.means()
    assert means["rewards/math_answer/mean"] == 1.0 and math.isclose(means["reward"], (1.5 + 1.25) / 3)
    with pytest.raises(TunekitError, match="rewards\\[0\\]: .*unknown parameter 'slop' \\(did you mean 'slope'"):
        combine([{"name": "length", "max": 3, "slop": 1}])
    with pytest.raises(TunekitError, match="rewards\\[1\\]: reward 'length': give `min`, `max` or both"):
        combine([{"name": "format", "tags": ["a"]}, {"name": "length"}])


def test_tracker_length_and_share():
    tr = RewardTracker(window=2, length_growth=2.0, max_share=0.8, max_completion_length=30)
    assert tr.update([10, 10], {"a": [0.5, 0.5], "b": [0.5, 0.5]}) == []
    assert tr.update([10, 10], {"a": [0.5, 0.5], "b": [0.5, 0.5]}) == []  # baseline: length 10, shares 50/50
    warnings = tr.update([30, 30], {"a": [1.0, 1.0], "b": [0.0, 0.0]}, step=3)
    # window means: length (10+30)/2 = 20 = 2x; truncated (0+1)/2 = 50%; share a = 0.75/(0.75+0.25) = 75%
    assert len(warnings) == 2
    assert "mean completion length 20 tokens is 2.0x its start (10)" in warnings[0]
    assert "50% of completions hit max_completion_length (30)" in warnings[1]
    warnings = tr.update([30, 30], {"a": [1.0, 1.0], "b": [0.0, 0.0]}, step=4)
    # length and truncation already warned (once per episode); share a = 1.0/(1.0+0) = 100%
    assert warnings == ["step 4: reward 'a' makes 100% of the weighted reward (was 50% at the start); the others "
                        "barely steer training (reward hacking?)"]
    assert tr.shares({"a": 1.0, "b": 1.0}) == {"a": 1.0, "b": 0.0}


def test_tracker_from_grpo_logs():
    tr = RewardTracker(window=1, max_share=0.9)
    logs = {"completions/mean_length": 8.0, "completions/clipped_ratio": 0.0, "rewards/math_answer/mean": 0.2,
            "rewards/format/mean": 0.2, "loss": 0.1}
    weights = {"math_answer": 1.0, "format": 2.0}
    assert tr.update_from_logs(logs, weights=weights) == []  # baseline: format's share 2*0.2 / (0.2 + 0.4) = 67%
    logs.update({"completions/mean_length": 16.0, "completions/clipped_ratio": 0.75, "rewards/format/mean": 1.0})
    # share of format with weight 2: |2*1.0| / (|1*0.2| + |2*1.0|) = 2/2.2 = 91%
    warnings = tr.update_from_logs(logs, weights=weights, step=7)
    assert [w.split(":")[0] for w in warnings] == ["step 7"] * 3
    assert "16 tokens is 2.0x its start (8)" in warnings[0]
    assert "75% of completions hit max_completion_length over the last 1 steps" in warnings[1]
    assert "reward 'format' makes 91% of the weighted reward (was 67% at the start)" in warnings[2]
    assert tr.update_from_logs({"loss": 0.0}) == []  # an eval or end-of-training log line


def test_required_columns_checked_before_training():
    from tunekit.rewards import RewardSet

    rs = RewardSet.from_specs([{"name": "math_answer", "column": "gold"}, {"name": "code_tests"},
                               {"name": "format", "pattern": "x"}])
    assert rs.required_columns() == {"math_answer": ("gold",), "code_tests": ("tests",), "format": ()}
    rs.check_columns(["gold", "tests", "id"])
    with pytest.raises(TunekitError, match="reward 'code_tests' reads the column 'tests', which the data lacks "
                                           "\\(columns: gold\\)"):
        rs.check_columns(["gold"])
