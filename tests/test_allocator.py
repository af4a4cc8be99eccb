"""Training commands re-execute once under jemalloc when the system has it; `TUNEKIT_ALLOCATOR=system` and other
commands keep glibc's malloc. Real `tunekit sft` runs; the run card reads /proc/self/maps, not a flag."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.launch.allocator import command_of, jemalloc_library

has_jemalloc = pytest.mark.skipif(jemalloc_library() is None, reason="no jemalloc here (apt-get install libjemalloc2)")


def test_command_is_the_first_word_after_the_options():
    assert command_of(["tunekit", "--debug", "sft", "r.yaml"]) == "sft"
    assert command_of(["tunekit", "merge", "m.yaml"]) == "merge"
    assert command_of(["tunekit", "--version"]) is None


def _sft(tmp_path, model_dir, env_value):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / f"run-{env_value}"
    sets = [f"model.name={model_dir}", f"data.train={data}", "train.max_steps=1", "train.save_steps=0",
            "generate.samples=0"]
    old = os.environ.get("TUNEKIT_ALLOCATOR")
    os.environ["TUNEKIT_ALLOCATOR"] = env_value
    try:
        res = run_cli("sft", *[a for s in sets for a in ("--set", s)], "--output", out)
    finally:
        os.environ.pop("TUNEKIT_ALLOCATOR") if old is None else os.environ.__setitem__("TUNEKIT_ALLOCATOR", old)
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((out / "run_card.json").read_text())
    return card


@has_jemalloc
def test_training_runs_under_jemalloc_unless_told_otherwise(tmp_path, tiny_model_dir):
    card = _sft(tmp_path, tiny_model_dir, "auto")
    assert card["hardware"]["allocator"] == "jemalloc"
    assert card["command"][1:3] == ["sft", "--set"]  # the same command line after the re-execution
    assert _sft(tmp_path, tiny_model_dir, "system")["hardware"]["allocator"] == "system"
