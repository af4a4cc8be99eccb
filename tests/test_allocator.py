"""Training commands re-execute once under jemalloc when the system has it; `TUNEKIT_ALLOCATOR=system` and other
commands keep glibc's malloc. Real `tunekit sft` runs; the run card reads /proc/self/maps, not a flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.launch.allocator import command_of, jemalloc_library

has_jemalloc = pytest.mark.skipif(jemalloc_library() is None, reason="no jemalloc here (apt-get install libjemalloc2)")


def test_command_is_the_first_word_after_the_options():
    assert command_of(["tunekit", "--debug", "sft", "r.yaml"]) == "sft"
    assert command_of(["tunekit", "merge", "m.yaml"]) == "merge"
    assert command_of(["tunekit", "--version"]) is None


def _sft(tmp_path, model_dir, monkeypatch, allocator):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / f"run-{allocator}"
    sets = [f"model.name={model_dir}", f"data.train={data}", "train.max_steps=1", "train.save_steps=0",
            "generate.samples=0"]
    monkeypatch.setenv("TUNEKIT_ALLOCATOR", allocator)
    res = run_cli("sft", *[a for s in sets for a in ("--set", s)], "--output", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "run_card.json").read_text())


@has_jemalloc
def test_training_runs_under_jemalloc_unless_told_otherwise(tmp_path, tiny_model_dir, monkeypatch):
    card = _sft(tmp_path, tiny_model_dir, monkeypatch, "auto")
    assert card["hardware"]["allocator"] == "jemalloc"
    assert card["command"][1:3] == ["sft", "--set"]  # the same command line after the re-execution
    assert _sft(tmp_path, tiny_model_dir, monkeypatch, "system")["hardware"]["allocator"] == "system"


@has_jemalloc
def test_other_commands_keep_the_system_allocator():
    code = ("from tunekit.launch.allocator import allocator_in_use, use_jemalloc; "
            "use_jemalloc(['tunekit', 'merge', 'm.yaml']); print(allocator_in_use())")
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEKIT_ALLOCATOR", "TUNEKIT_ALLOCATOR_ACTIVE")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "system", res.stderr[-2000:]
