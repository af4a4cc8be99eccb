"""Recipes: overrides, did-you-mean errors with line numbers, exit code 2 with nothing written."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli
from tunekit.config.load import load_recipe, parse_overrides
from tunekit.errors import TunekitError


def test_overrides_parse_yaml_values(tmp_path):
    r = load_recipe(None, ["train.lr=1e-4", "adapter.targets=[q_proj, v_proj]", "data.packing=true",
                           "adapter.method=dora", "data.train=x.jsonl", "train.report_to=tensorboard"])
    assert r.train.lr == 1e-4
    assert r.adapter.targets == ["q_proj", "v_proj"]
    assert r.data.packing is True
    assert r.adapter.method == "dora"
    assert r.train.report_to == ["tensorboard"]
    assert parse_overrides(["a.b=null"]) == [("a.b", None)]


def test_file_then_override_wins(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.1\n  batch_size: 2\n")
    r = load_recipe(p, ["train.lr=0.5"])
    assert r.train.lr == 0.5 and r.train.batch_size == 2


def test_override_into_list_of_sources(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  train:\n    - path: a.jsonl\n    - path: b.jsonl\n      weight: 2\n")
    r = load_recipe(p, ["data.train.0.weight=0.5"])
    assert [s.weight for s in r.data.train] == [0.5, 2.0]


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("adapter:\n  rank: 8\n", "r.yaml:2: unknown key 'adapter.rank' (did you mean 'adapter.r'?)"),
        ("train:\n  lr: -1\n", "r.yaml:2: key 'train.lr'"),
        ("data:\n  train:\n    - path: a.jsonl\n      wieght: 2\n", "r.yaml:4: unknown key 'data.train.0.wieght' "
         "(did you mean 'data.train.weight'?)"),
        ("modle:\n  name: x\n", "unknown key 'modle' (did you mean 'model'?)"),
        ("train: [1, 2\n", "invalid YAML"),
    ],
)
def test_bad_recipe_messages(tmp_path, yaml_text, expected):
    p = tmp_path / "r.yaml"
    p.write_text(yaml_text)
    with pytest.raises(TunekitError) as exc:
        load_recipe(p)
    assert expected in str(exc.value)


def test_cli_bad_key_exit_2_no_traceback_nothing_written(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name: x\nadapter:\n  rnak: 8\n")
    out = tmp_path / "run"
    res = run_cli("sft", p, "--output", out)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {p}:4: unknown key 'adapter.rnak' (did you mean 'adapter.r'?)"
    ]
    assert "Traceback" not in res.stderr + res.stdout
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_cli_bad_set_key(tmp_path):
    res = run_cli("sft", "--set", "train.lrr=1", "--output", tmp_path / "run")
    assert res.returncode == 2
    assert "--set train.lrr: unknown key (did you mean 'train.lr'?)" in res.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_shows_resolved_recipe():
    res = run_cli("sft", "--set", "adapter.r=8", "--print-config")
    assert res.returncode == 0, res.stderr
    assert "  r: 8\n" in res.stdout and "trust_remote_code: false" in res.stdout


def test_help_and_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("tunekit ")
    res = run_cli("--help")
    assert res.returncode == 0
    commands = [c for c in ("sft", "eval", "merge", "quantize") if f" {c} " in res.stdout]
    assert {"sft", "eval"} <= set(commands)
    for cmd in commands:
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, cmd


def test_every_bundled_recipe_is_valid():
    from tests.helpers import ROOT

    recipes = sorted((ROOT / "recipes").glob("sft-*.yaml"))
    assert len(recipes) >= 9
    for path in recipes:
        r = load_recipe(path)
        assert r.stage == "sft" and r.model.name == "smollm2-135m", path
