"""`tunekit merge` CLI: config and short forms end to end; bad input exits 2 before anything is written."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tunekit.cli.app import app
from tunekit.merge.io import SafetensorsFolder

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, ["merge", *map(str, args), "--no-progress"])


def _write(tmp_path, cfg, name="merge.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _slerp(a, b, **extra):
    return {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": 0.5},
        **extra,
    }


def test_config_merge_and_short_form_agree(tmp_path, tiny_model_dir, tiny_model_dir_b):
    cfg = _write(tmp_path, _slerp(tiny_model_dir, tiny_model_dir_b, dtype="bfloat16"))
    res = _invoke(cfg, tmp_path / "out")
    assert res.exit_code == 0, res.output
    res2 = _invoke(
        "--method",
        "slerp",
        "--t",
        "0.5",
        "--dtype",
        "bf16",
        tiny_model_dir,
        tiny_model_dir_b,
        "-o",
        tmp_path / "short",
    )
    assert res2.exit_code == 0, res2.output
    x, y = SafetensorsFolder(tmp_path / "out"), SafetensorsFolder(tmp_path / "short")
    assert all(torch.equal(x.read(n), y.read(n)) for n in x.names())
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "README.md").is_file()
    # existing output needs --overwrite
    res3 = _invoke(cfg, tmp_path / "out")
    assert res3.exit_code == 2 and "--overwrite" in res3.output
    assert _invoke(cfg, tmp_path / "out", "--overwrite").exit_code == 0


def test_short_forms_ties_and_adapter(tmp_path, tiny_model_dir, tiny_model_dir_b):
    res = _invoke(
        "--method",
        "ties",
        "--base",
        tiny_model_dir,
        "--density",
        "0.5",
        "--weights",
        "1",
        tiny_model_dir_b,
        "-o",
        tmp_path / "ties",
    )
    assert res.exit_code == 0, res.output
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    res = _invoke("--base", tiny_model_dir, "--adapter", tmp_path / "adapter", "-o", tmp_path / "folded")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "folded" / "model.safetensors").is_file()
    import shutil

    shutil.copytree(tmp_path / "adapter", tmp_path / "adapter2")
    res = _invoke(
        "--method", "adapter_sum", tmp_path / "adapter", tmp_path / "adapter2", "-o", tmp_path / "s"
    )
    assert res.exit_code == 2 and "plain LoRA" in res.output and not (tmp_path / "s").exists()


def _mutant(tmp_path, src, drop=None, reshape=None):
    """A copy of model `src` with a tensor dropped or replaced by one of another shape."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "mutant"
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    if drop:
        del t[drop]
    if reshape:
        t[reshape] = torch.zeros(600, t[reshape].shape[1])
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


BAD_CONFIGS = [
    ({"modules": {}}, "unsupported key 'modules'"),
    ({"merge_method": "frankenstein"}, "merge_method 'frankenstein' is not supported"),
    ({"parameters": {"t": 0.5, "density": 0.3}}, "parameter 'density' is not used by merge_method 'slerp'"),
    ({"parameters": {"t": 1.5}}, "t=1.5 is outside"),
    ({"parameters": {"t": [{"filter": "mlp", "value": 0.5}]}}, "missing required parameter 't'"),
    ({"dtype": "int4"}, "unsupported dtype 'int4'"),
    ({"tokenizer_source": "nope"}, "tokenizer_source 'nope' is not one of the models"),
    ({"base_model": None}, "slerp needs base_model"),
]


@pytest.mark.parametrize(("patch", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_exit_2_and_write_nothing(tmp_path, tiny_model_dir, tiny_model_dir_b, patch, message):
    raw = {**_slerp(tiny_model_dir, tiny_model_dir_b), **patch}
    raw = {k: v for k, v in raw.items() if v is not None}
    cfg = _write(tmp_path, raw)
    out = tmp_path / "out"
    res = _invoke(cfg, out)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and message in res.output, res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_mismatched_models_exit_2_naming_the_tensor(tmp_path, tiny_model_dir, tiny_model_dir_b):
    missing = _mutant(tmp_path, tiny_model_dir_b, drop="model.layers.1.mlp.down_proj.weight")
    res = _invoke("--method", "slerp", "--t", "0.5", tiny_model_dir, missing, "-o", tmp_path / "o1")
    assert res.exit_code == 2 and "'model.layers.1.mlp.down_proj.weight'" in res.output, res.output
    import shutil

    shutil.rmtree(missing)
    vocab = _mutant(tmp_path, tiny_model_dir_b, reshape="model.embed_tokens.weight")
    res = _invoke("--method", "slerp", "--t", "0.5", tiny_model_dir, vocab, "-o", tmp_path / "o2")
    assert res.exit_code == 2 and "model.embed_tokens.weight" in res.output and "vocabularies" in res.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_usage_errors_exit_2(tmp_path, tiny_model_dir):
    assert _invoke().exit_code == 2
    res = _invoke("--method", "slerp", tiny_model_dir, tiny_model_dir, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--t" in res.output
    res = _invoke("--method", "ties", tiny_model_dir, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--base" in res.output
    res = _invoke("--method", "slerp", "--t", "0.5", tiny_model_dir, tmp_path / "nope", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "nope" in res.output
    assert not (tmp_path / "o").exists()


def test_example_recipes_are_valid_configs():
    from pathlib import Path

    from tunekit.merge.config import load_config

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes", "merge").glob("*.yml"))
    assert len(recipes) >= 4
    for recipe in recipes:
        assert load_config(recipe).merge_method in recipe.stem


def test_merge_process_imports_no_training_libraries(tmp_path, tiny_model_dir):
    """`python -m tunekit merge` loads torch and safetensors only: transformers/datasets/peft/trl cost ~100 MB of
    RSS and seconds of start-up that a merge never uses (they are quieted when imported, see tunekit.quiet)."""
    import subprocess
    import sys

    cfg = _write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_model_dir), "layer_range": [0, 2]}]}]})
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['tunekit', 'merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--no-progress']\n"
        "try:\n    runpy.run_module('tunekit', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('transformers', 'datasets', 'peft', 'trl', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    src, dst = SafetensorsFolder(tiny_model_dir), SafetensorsFolder(tmp_path / "out")
    assert all(torch.equal(src.read(n), dst.read(n)) for n in dst.names())


def test_quieted_libraries_are_quiet_when_imported_later():
    import subprocess
    import sys

    code = (
        "import sys\nfrom tunekit.quiet import quiet_libraries\nquiet_libraries()\n"
        "assert 'transformers' not in sys.modules and 'datasets' not in sys.modules\n"
        "import datasets\nfrom transformers.utils import logging\n"
        "from tunekit.quiet import LIBRARY_LOG\n"
        "root = logging._get_library_root_logger()  # warnings go to the run's library.log, not the terminal\n"
        "print(LIBRARY_LOG in root.handlers, logging.is_progress_bar_enabled(),\n"
        "      datasets.logging.get_verbosity() == datasets.logging.ERROR, datasets.is_progress_bar_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True", "False"], out.stdout + out.stderr
