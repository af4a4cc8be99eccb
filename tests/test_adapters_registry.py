"""The adapter registry: every method is one registration, folding a saved adapter into a base in memory equals
the streaming merge plan (`tunekit merge`) and PEFT's merge_and_unload, targets that match nothing are refused,
and reward models (task seq_cls) train and save their `score` head or are refused with a reason."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from test_adapters_svd import adapter_config, batch, load, train_steps

from tunekit.adapters import (
    REGISTRY,
    AdapterKind,
    AttachContext,
    attach,
    check_targets,
    fold_adapter,
    get_method,
    kind_of,
    kinds,
    load_adapter,
    register,
    save_adapter,
)
from tunekit.config.schema import REWARD_MODEL_REFUSALS, AdapterConfig, Recipe
from tunekit.errors import TunekitError

ROOT = Path(__file__).resolve().parent.parent
FOLD_CASES = ["lora", "dora", "pissa", "milora", "lora_xs", "svft_banded", "svft_random"]


def test_every_method_is_one_registration_in_its_own_module():
    methods = typing.get_args(AdapterConfig.model_fields["method"].annotation)
    owners = {m: [k.name for k in kinds() if m in k.recipe_methods] for m in methods}
    assert all(len(v) == 1 for v in owners.values()), owners
    assert sorted(REGISTRY) == ["full", "lora", "lora_xs", "milora", "pissa", "svft"]
    for kind in kinds():
        module = sys.modules[kind.build.__module__]
        assert module.__name__ == f"tunekit.adapters.{'lora' if kind.name == 'lora' else kind.name}"
        assert module.KIND is kind
    assert get_method("dora").name == "lora" and get_method("none").name == "full"
    with pytest.raises(ValueError, match="registered twice"):
        register(AdapterKind("lora", REGISTRY["lora"].build))
    with pytest.raises(ValueError, match="already built by 'lora'"):
        register(AdapterKind("other", REGISTRY["lora"].build, methods=("dora",)))
    assert "other" not in REGISTRY
    with pytest.raises(TunekitError, match="unknown method 'loar'"):
        get_method("loar")


def test_each_registration_agrees_with_the_schemas_reward_model_table():
    """config/ owns which methods can train a reward model (a recipe is refused when it is read, without asking
    the adapters); each adapter kind's registration says the same."""
    methods = typing.get_args(AdapterConfig.model_fields["method"].annotation)
    assert set(REWARD_MODEL_REFUSALS) < set(methods)
    for method in methods:
        assert get_method(method).seq_cls_refusal == REWARD_MODEL_REFUSALS.get(method), method
        if method in REWARD_MODEL_REFUSALS:
            with pytest.raises(ValueError, match=f"adapter.method={method} cannot train a reward model: .*score"):
                Recipe(stage="rm", adapter=AdapterConfig(method=method))
        else:
            assert Recipe(stage="rm", adapter=AdapterConfig(method=method)).adapter.method == method


def test_no_import_circle_and_no_merge_import_in_adapters():
    assert not (ROOT / "tunekit/adapters/extra.py").exists()
    for file in (ROOT / "tunekit/adapters").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tunekit.merge"), (file.name, node.module)
    code = "import tunekit.merge.adapters; from tunekit.adapters import kinds; print(len(kinds()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "6", proc.stderr[-2000:]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """Each method trained 2 steps on the tiny model and saved."""
    root = tmp_path_factory.mktemp("registry")
    out = {}
    for name in FOLD_CASES:
        torch.manual_seed(0)
        cfg = adapter_config(name, r=4, dropout=0.0)
        model = attach(load(tiny_model_dir), cfg, AttachContext())
        train_steps(model, steps=2)
        with torch.no_grad():
            logits = model(batch(3)).logits
        save_adapter(model, cfg, root / name)
        out[name] = (root / name, logits)
    return out


@pytest.mark.parametrize("name", FOLD_CASES)
def test_fold_in_memory_equals_streaming_merge_and_trained_model(name, saved, tiny_model_dir, tmp_path):
    from tunekit.merge.adapters import merge_adapter
    from tunekit.merge.io import SafetensorsFolder

    folder, trained_logits = saved[name]
    folded = fold_adapter(load(tiny_model_dir), folder)
    assert not any("lora" in n or "svft" in n for n, _ in folded.named_parameters())  # a plain model
    merged = SafetensorsFolder(merge_adapter(tiny_model_dir, folder, tmp_path / "m", progress=False, log=print))
    state = folded.state_dict()
    base = SafetensorsFolder(tiny_model_dir)
    changed = 0
    for tname in merged.names():
        ours, theirs = state[tname], merged.read(tname, dtype=torch.float32)
        assert torch.allclose(ours, theirs, atol=1e-5), (tname, (ours - theirs).abs().max())
        changed += not torch.equal(theirs, base.read(tname, dtype=torch.float32))
    assert changed >= 2 * 2  # the adapter moved weights in both layers
    with torch.no_grad():
        diff = (folded(batch(3)).logits - trained_logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_fold_equals_peft_merge_and_unload(name, saved, tiny_model_dir):
    from peft import PeftModel

    folder, _ = saved[name]
    theirs = PeftModel.from_pretrained(load(tiny_model_dir), str(folder)).merge_and_unload().state_dict()
    for n, t in fold_adapter(load(tiny_model_dir), folder).state_dict().items():
        assert torch.allclose(t, theirs[n], atol=1e-5), n


def test_load_and_kind_of_saved_folders(saved, tiny_model_dir):
    assert {n: kind_of(saved[n][0]).name for n in ("lora", "pissa", "lora_xs", "svft_banded")} == {
        "lora": "lora", "pissa": "lora", "lora_xs": "lora_xs", "svft_banded": "svft"}
    folder, trained_logits = saved["lora_xs"]
    with torch.no_grad():
        assert (load_adapter(load(tiny_model_dir), folder)(batch(3)).logits - trained_logits).abs().max() < 1e-5
    with pytest.raises(TunekitError, match="no known adapter files"):
        kind_of(tiny_model_dir)


def test_fold_refuses_a_quantized_base(saved, tiny_model_dir):
    from transformers import BitsAndBytesConfig

    model = load(tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"})
    with pytest.raises(TunekitError, match="16/32-bit, not 4/8-bit"):
        fold_adapter(model, saved["lora"][0])


def test_check_targets_names_what_matches_nothing(tiny_model_dir):
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import build_meta_model

    for model in (load(tiny_model_dir), build_meta_model(ModelConfig(name=str(tiny_model_dir)))):
        with pytest.raises(TunekitError, match=r"adapter.targets: 'qproj', 'v' match no module"):
            attach(model, AdapterConfig(targets=["q_proj", "qproj", "v"]), AttachContext(meta=True))
        with pytest.raises(TunekitError, match=r"adapter.modules_to_save: 'lm_hed' matches no module"):
            check_targets(model, AdapterConfig(modules_to_save=["lm_hed"]))
        with pytest.raises(TunekitError, match="regular expression '.*attn.q' matches no module"):
            check_targets(model, AdapterConfig(targets=".*attn.q"))
        check_targets(model, AdapterConfig(targets=r".*self_attn\.(q|v)_proj", modules_to_save=["lm_head"]))
        check_targets(model, AdapterConfig(method="none", targets=["nothing"]))  # full fine-tuning: no targets


def _reward_model(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = 0
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "none"])
def test_seq_cls_trains_and_saves_the_score_head(method, tiny_model_dir, tmp_path):
    from peft import PeftModel

    cfg = AdapterConfig(method=method, r=4, dropout=0.0)
    model = attach(_reward_model(tiny_model_dir), cfg, AttachContext(task="seq_cls"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable), trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(2):
        model(input_ids=batch(i)).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch(5)).logits
    save_adapter(model, cfg, tmp_path / "rm")
    if method == "none":
        from transformers import AutoModelForSequenceClassification

        again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    else:  # vanilla PEFT on a freshly initialised head: the saved score head must replace it
        torch.manual_seed(123)
        again = PeftModel.from_pretrained(_reward_model(tiny_model_dir), str(tmp_path / "rm"))
    with torch.no_grad():
        got = again.eval()(input_ids=batch(5)).logits
    assert got.shape == (2, 1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("method", ["lora_xs", "svft", "pissa", "milora"])
def test_seq_cls_refused_with_reason(method, tiny_model_dir):
    with pytest.raises(TunekitError, match=f"adapter.method={method} cannot train a reward model: .*score"):
        attach(_reward_model(tiny_model_dir), AdapterConfig(method=method, r=4), AttachContext(task="seq_cls"))
