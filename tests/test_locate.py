"""One place decides what a folder is (run, adapter, model) and which base it needs."""

from __future__ import annotations

import json

import pytest

from tunekit.errors import TunekitError
from tunekit.run.locate import locate


def test_locate_kinds(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model:\n  name: my/base\n  load_in_4bit: true\n")
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "other"}))
    loc = locate(run)
    assert loc.kind == "run" and loc.adapter_dir == run / "adapter" and loc.model_dir is None
    assert loc.base.name == "my/base" and loc.base.load_in_4bit
    inner = locate(run / "adapter")  # an adapter inside a run takes the run's base, not the config's
    assert inner.kind == "adapter" and inner.run_dir == run and inner.base.name == "my/base"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "other"}))
    assert locate(lone).base.name == "other" and locate(lone).run_dir is None
    xs = tmp_path / "xs"
    xs.mkdir()
    (xs / "lora_xs_config.json").write_text("{}")
    assert locate(xs).kind == "adapter" and locate(xs).base is None
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    (full / "recipe.yaml").write_text("model:\n  name: my/base\n")
    assert locate(full).model_dir == full / "model" and locate(full).adapter_dir is None
    assert locate(tiny_model_dir).kind == "model"
    assert locate("smollm2-135m") is None and locate(tmp_path / "missing") is None


def test_locate_errors(tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("model:\n  name: x\n")
    with pytest.raises(TunekitError, match="neither adapter/ nor model/"):
        locate(unfinished)
    (tmp_path / "junk").mkdir()
    with pytest.raises(TunekitError, match="not a model folder"):
        locate(tmp_path / "junk")
    bad = tmp_path / "bad"
    (bad / "adapter").mkdir(parents=True)
    (bad / "recipe.yaml").write_text("model:\n  nme: x\n")
    with pytest.raises(TunekitError, match="recipe.yaml: invalid model section"):
        locate(bad)
