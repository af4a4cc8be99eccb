"""Rewards as a contract: the format reward's R1 default; a user's reward function that raises or returns the
wrong thing is named (python:module:function), exit 2, never an internal error; non-finite weights and values
are refused; eval's --reward is checked before any work."""

from __future__ import annotations

import math
import textwrap

import pytest

from tests.contract import refused
from tests.helpers import QA, run_cli, write_jsonl
from tunekit.errors import TunekitError
from tunekit.rewards import RewardSet, get_reward

HOSTILE = textwrap.dedent("""
    def raises(completions, **kw):
        raise KeyError("answer")

    def short(completions, **kw):
        return [1.0] * (len(completions) - 1)

    def strings(completions, **kw):
        return ["good"] * len(completions)

    def returns_none(completions, **kw):
        return None

    def infinite(completions, **kw):
        return [float("inf")] * len(completions)

    def nan_is_not_applicable(completions, **kw):
        return [float("nan"), None] + [0.5] * (len(completions) - 2)
""")


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    (tmp_path / "hostile_rewards.py").write_text(HOSTILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:hostile_rewards:"


def test_format_defaults_to_the_r1_convention_and_says_so(capsys):
    reward = get_reward("format")
    good = "<think>2 plus 2</think>\n<answer>4</answer>"
    assert reward(completions=[good, "4", "<answer>4</answer>"]) == [1.0, 0.0, 0.0]
    assert "using the R1 convention <think>...</think><answer>...</answer>" in capsys.readouterr().err
    with pytest.raises(TunekitError, match="not both"):
        get_reward("format", pattern="x", tags=["a"])


@pytest.mark.parametrize("fn, message", [
    ("raises", "reward 'python:hostile_rewards:raises' raised KeyError: 'answer'"),
    ("short", "reward 'python:hostile_rewards:short' returned 3 values for 4 completions"),
    ("strings", "reward 'python:hostile_rewards:strings' returned a str ('good'); rewards must be numbers"),
    ("returns_none", "reward 'python:hostile_rewards:returns_none' returned NoneType; it must return a list"),
    ("infinite", "reward 'python:hostile_rewards:infinite' returned inf; rewards must be finite"),
])
def test_a_broken_user_reward_is_named(hostile, fn, message):
    rewards = RewardSet.from_specs([{"name": hostile + fn}])
    with pytest.raises(TunekitError) as err:
        rewards.score(["p"] * 4, ["a", "b", "c", "d"])
    assert str(err.value).startswith(message), str(err.value)


def test_nan_and_none_stay_not_applicable(hostile):
    scores = RewardSet.from_specs([{"name": hostile + "nan_is_not_applicable"}]).score(["p"] * 3, ["a", "b", "c"])
    assert scores.per_reward["nan_is_not_applicable"] == [None, None, 0.5]
    assert scores.total.tolist() == [0.0, 0.0, 0.5]


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_a_non_finite_weight_is_refused(weight):
    with pytest.raises(TunekitError, match=r"rewards\[0\]"):
        RewardSet.from_specs([{"name": "format", "weight": weight}])


def test_grpo_with_a_raising_user_reward_exits_2_naming_it(tmp_path, tiny_model_dir, hostile):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} plus 1?"} for a in range(4)])
    sets = [f"model.name={tiny_model_dir}", f"data.train={prompts}", "train.max_steps=1", "train.batch_size=2",
            "train.save_steps=0", "grpo.num_generations=2", "grpo.max_completion_length=4", "generate.samples=0",
            f"rewards=[{{name: '{hostile}raises'}}]"]
    out = tmp_path / "run"
    import os

    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}" if env_path else str(tmp_path)
    try:
        res = run_cli("grpo", *[a for s in sets for a in ("--set", s)], "--output", out)
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            os.environ.pop("PYTHONPATH")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert errors == ["error: reward 'python:hostile_rewards:raises' raised KeyError: 'answer'"], res.stderr
    assert not out.exists() and not out.with_name("run.partial").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--reward", "math_answr"], "math_answr"),
    (["--reward", ""], "reward"),
    (["--reward", "python:no_such_module_xyz:fn"], "cannot import no_such_module_xyz"),
    (["--reward", "math_answer", "--no-generate"], "--reward: no effect with --no-generate"),
])
def test_eval_reward_is_checked_before_any_work(tmp_path, monkeypatch, tiny_model_dir, extra, expected):
    write_jsonl(tmp_path / "d.jsonl", QA)
    monkeypatch.chdir(tmp_path)
    line, _ = refused(["eval", str(tiny_model_dir), "--data", "d.jsonl", *extra], tmp_path)
    assert expected in line, line


@pytest.mark.parametrize("name, params, message", [
    ("code_tests", {"interpreter": "/bin/sh"}, "interpreter '/bin/sh' is not a Python 3 interpreter"),
    ("code_tests", {"memory_mb": 0}, "memory_mb must be a whole number >= 64"),
    ("code_tests", {"timeout": math.nan}, "timeout must be a finite number > 0"),
    ("length", {"max": math.nan}, "max must be a finite number"),
    ("length", {"min": -3}, "min and max must be >= 0"),
])
def test_reward_parameters_are_checked_when_built(name, params, message):
    """Before training (GRPO builds its rewards in the data step), not at the first reward call as an internal
    error or a sandbox failure."""
    with pytest.raises(TunekitError, match=message):
        RewardSet.from_specs([{"name": name, **params}])
