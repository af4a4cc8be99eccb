"""All validation before work: the YAML loader's refusals, transformers' own trainer names with did-you-mean,
options with no effect, finite numbers, and adapter targets checked against the model's modules."""

from __future__ import annotations

import time

import pytest

from tunekit.config.load import load_recipe, safe_yaml
from tunekit.errors import TunekitError


def _load(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(p)


def test_yaml_anchors_still_work_but_bombs_and_recursion_do_not(tmp_path):
    r = _load(tmp_path, "train: &t\n  lr: 1.0e-3\n  batch_size: 2\ngenerate:\n  prompts: [&p hi, *p]\n")
    assert r.train.lr == 1e-3 and r.generate.prompts == ["hi", "hi"]
    data, _ = safe_yaml("base: &b {lr: 0.1, batch_size: 2}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    assert data["train"] == {"lr": 0.2, "batch_size": 2}
    bomb = "a: &a [" + ",".join(["x"] * 10) + "]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    start = time.perf_counter()
    with pytest.raises(TunekitError, match="alias bomb"):
        _load(tmp_path, bomb)  # 10^9 nodes if expanded
    assert time.perf_counter() - start < 5
    for text in ("a: &a [1, *a]\n", "a: &a {b: *a}\n", "a: &a\n  - - *a\n"):
        with pytest.raises(TunekitError, match="recursive alias"):
            _load(tmp_path, text)


def test_non_finite_numbers_are_refused_everywhere(tmp_path):
    for text in ("train:\n  lr: .nan\n", "train:\n  lr: .inf\n", "adapter:\n  alpha: -.inf\n",
                 "train:\n  warmup_ratio: .NaN\n", "data:\n  eval_split: 'inf'\n", "train:\n  epochs: 1e400\n"):
        with pytest.raises(TunekitError, match="finite"):
            _load(tmp_path, text)
    for override in ("train.lr=nan", "train.lr=.nan", "train.lr=-inf", "adapter.alpha=Infinity",
                     "train.max_grad_norm=.inf"):
        with pytest.raises(TunekitError, match="finite"):
            load_recipe(None, [override])


def test_trainer_names_come_from_transformers_with_did_you_mean():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for s in SchedulerType:
        assert load_recipe(None, [f"train.lr_scheduler={s.value}"]).train.lr_scheduler == s.value
    for o in ("adamw_torch", "sgd", "adafactor", "paged_adamw_8bit"):
        assert o in {x.value for x in OptimizerNames}
        assert load_recipe(None, [f"train.optim={o}"]).train.optim == o
    cases = {"train.lr_scheduler=cosin": "did you mean 'cosine'", "train.lr_scheduler=linaer": "'linear'",
             "train.optim=adam_torch": "'adamw_torch'", "train.optim=sgdd": "'sgd'",
             "train.report_to=tensorbord": "'tensorboard'", "train.report_to=[mlfow]": "'mlflow'"}
    for override, hint in cases.items():
        with pytest.raises(TunekitError, match=hint):
            load_recipe(None, [override])


def test_options_without_effect_are_errors_but_defaults_round_trip():
    from tunekit.config.load import dump_recipe, validate

    bad = [
        (["adapter.method=lora", "adapter.svd_niter=2"], "adapter.svd_niter: no effect"),
        (["adapter.method=dora", "adapter.lora_xs_init_std=0"], "adapter.lora_xs_init_std: no effect"),
        (["model.bnb_4bit_double_quant=false"], "without model.load_in_4bit"),
    ]
    for overrides, message in bad:
        with pytest.raises(TunekitError, match=message):
            load_recipe(None, overrides)
    import yaml

    for method in ("none", "lora", "dora", "pissa", "milora", "lora_xs", "svft"):
        recipe = load_recipe(None, [f"adapter.method={method}"])
        assert validate(yaml.safe_load(dump_recipe(recipe))) == recipe  # a run's recipe.yaml loads again
    assert load_recipe(None, ["model.load_in_4bit=true", "model.bnb_4bit_quant_type=fp4"]).model.load_in_4bit


def test_adapter_targets_must_match_a_module(tiny_model_dir):
    from tunekit.adapters import check_targets
    from tunekit.config.schema import AdapterConfig, ModelConfig
    from tunekit.models.load import build_meta_model

    model = build_meta_model(ModelConfig(name=str(tiny_model_dir)))
    for ok in (["q_proj", "v_proj"], ["self_attn.q_proj"], "all-linear", r".*\.(q|v)_proj"):
        check_targets(model, AdapterConfig(targets=ok))
    check_targets(model, AdapterConfig(modules_to_save=["lm_head"]))
    check_targets(model, AdapterConfig(method="none"))
    cases = [
        (AdapterConfig(targets=["q_proj", "qproj"]), "'qproj' matches no module"),
        (AdapterConfig(targets=r".*\.w_q"), "matches no module"),
        (AdapterConfig(modules_to_save=["score"]), "modules_to_save: 'score' matches no module"),
        (AdapterConfig(method="dora", targets=["Q_PROJ"]), "'Q_PROJ' matches no module"),
    ]
    for cfg, message in cases:
        with pytest.raises(TunekitError, match=message):
            check_targets(model, cfg)
