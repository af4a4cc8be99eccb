"""Trust never travels with artifacts: trust_remote_code read from a run's recipe, an adapter config or a merge
config is ignored with a warning; model code runs only when the user asks on the command line."""

from __future__ import annotations

import json
import shutil

from tests.helpers import QA, write_jsonl
from tunekit.run.locate import locate

EVIL = '''
from pathlib import Path
Path(MARKER).write_text("the model folder's code was executed")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _run_with_remote_code(tmp_path, tiny_model_dir):
    """A full-fine-tuning run dir whose model ships its own Python and whose recipe asks to trust it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    cfg = json.loads((run / "model" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (run / "model" / "config.json").write_text(json.dumps(cfg))
    (run / "model" / "evil.py").write_text(EVIL.replace("MARKER", repr(str(tmp_path / "CODE_RAN"))))
    (run / "recipe.yaml").write_text(f"model:\n  name: {run / 'model'}\n  trust_remote_code: true\n")
    return run


def test_eval_of_a_run_that_asks_for_trust_runs_no_code(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    run = _run_with_remote_code(tmp_path, tiny_model_dir)
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:2])
    res = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--no-generate"])
    assert res.exit_code == 0, res.output
    assert "ignoring trust_remote_code: true" in res.stderr
    assert not (tmp_path / "CODE_RAN").exists()
    # the positive control: asked on the command line, the code runs (so the check above can fail)
    res = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--no-generate", "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "CODE_RAN").exists()


def test_locate_strips_trust_from_run_and_adapter_configs(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model:\n  name: org/base\n  trust_remote_code: true\n")
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    loc = locate(run)
    assert loc.base.name == "org/base" and loc.base.trust_remote_code is False
    assert "ignoring trust_remote_code" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base", "trust_remote_code": True}))
    loc = locate(adapter)
    assert loc.base.name == "org/base" and loc.base.trust_remote_code is False
    assert "adapter_config.json: ignoring trust_remote_code" in capsys.readouterr().err


def test_merge_config_trust_is_ignored_with_a_warning(tmp_path, capsys):
    from tunekit.merge.config import load_config

    cfg = tmp_path / "m.yml"
    cfg.write_text("merge_method: linear\ntrust_remote_code: true\nmodels:\n  - model: a\n  - model: b\n")
    loaded = load_config(cfg)
    assert loaded.model_names() == ["a", "b"]
    assert "m.yml: ignoring trust_remote_code" in capsys.readouterr().err


def test_own_recipe_may_ask_for_trust(tmp_path):
    from tunekit.config.load import load_recipe

    assert load_recipe(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
