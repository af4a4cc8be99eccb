"""Chaining runs: `model.name` = a finished run (or adapter folder) loads as its base with the adapter folded in
memory, with the run's tokenizer (added chat tokens included); the next run trains on top of it, its
adapter-disabled reference is the folded model, `--dry-run` works on a run directory, the chain is recorded,
4-bit loading folds in 16-bit first, and `tunekit merge` of a chained run folds every adapter of the chain."""

from __future__ import annotations

import pytest
import torch
from test_adapters_svd import batch, load, train_steps

from tests.helpers import QA, write_jsonl
from tunekit.adapters import AttachContext, attach, fold_adapter, load_adapter, save_adapter
from tunekit.config import load_recipe
from tunekit.config.schema import AdapterConfig, ModelConfig
from tunekit.models.load import build_meta_model, chain_of, load_model, load_tokenizer


def _recipe(model_name, data, out, *extra):
    return load_recipe(None, [f"model.name={model_name}", f"data.train={data}", f"output={out}",
                              "train.max_steps=2", "train.batch_size=2", "train.lr=1e-2", "train.save_steps=0",
                              "generate.samples=0", "data.max_length=64", *extra])


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


NEW_TOKENS = ["<|tool|>", "<|/tool|>"]


@pytest.fixture(scope="module")
def grown_base(tiny_model_dir, tmp_path_factory):
    """The tiny model with two tokens more in its tokenizer than rows in its embeddings (as a chat template
    that adds tokens): a run on it resizes the embeddings and trains the new rows (trainable tokens)."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("grown") / "model"
    shutil.copytree(tiny_model_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS}, replace_extra_special_tokens=False)
    tok.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def sft_runs(grown_base, tmp_path_factory):
    """sft on the grown base -> sft on the first run's result (as dpo or grpo would chain)."""
    from tunekit.stages.sft import run_sft

    root = tmp_path_factory.mktemp("chain")
    data = write_jsonl(root / "qa.jsonl", [{**r, "output": f"<|tool|>{r['output']}<|/tool|>"} for r in QA])
    first = run_sft(_recipe(grown_base, data, root / "sft"))
    second = run_sft(_recipe(first.path, data, root / "sft2", "adapter.r=4"))
    return first, second


def _ids(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text + "<|tool|>Paris<|/tool|>", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


@pytest.mark.slow
def test_run_loads_as_base_plus_adapter_with_its_tokenizer(sft_runs, grown_base):
    from peft import PeftModel

    first, _ = sft_runs
    cfg = ModelConfig(name=str(first.path))
    tok = load_tokenizer(cfg)
    rows = load(grown_base).get_input_embeddings().weight.shape[0]
    assert len(tok) == rows + 2 and "<|im_start|>" in tok.chat_template
    assert (first.path / "adapter/adapter_config.json").read_text().count(str(rows)) >= 1  # trainable tokens
    ids = _ids(tok)
    assert ids.max().item() >= rows  # the prompt uses the added tokens
    model = load_model(cfg, tok)
    assert not hasattr(model, "peft_config") and not hasattr(model, "tunekit_new_token_ids")
    base = load(grown_base)
    base.resize_token_embeddings(len(tok))
    want = _logits(PeftModel.from_pretrained(base, str(first.path / "adapter")), ids)
    got = _logits(model, ids)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(got, _logits(first.model, ids), atol=1e-5)  # = the model the run trained
    assert model.tunekit_chain == [{"path": str(first.path.resolve()), "kind": "lora", "base": str(grown_base)}]


@pytest.mark.slow
def test_chained_run_trains_on_the_folded_model(sft_runs, tiny_model_dir):
    first, second = sft_runs
    tok = load_tokenizer(ModelConfig(name=str(second.path)))
    ids = _ids(tok)
    folded = load_model(ModelConfig(name=str(first.path)), tok)
    with second.model.disable_adapter():  # the DPO reference: one copy of the weights, the earlier result
        assert torch.allclose(_logits(second.model, ids), _logits(folded, ids), atol=1e-5)
    trained = _logits(second.model, ids)
    assert (trained - _logits(folded, ids)).abs().max() > 1e-3  # the second run learned on top
    again = load_model(ModelConfig(name=str(second.path)), tok)
    assert torch.allclose(_logits(again, ids), trained, atol=1e-4)
    assert [link["path"] for link in again.tunekit_chain] == [str(first.path.resolve()), str(second.path.resolve())]
    assert again.tunekit_chain[1]["base"] == str(first.path)
    # the second run's own recipe points at the first: eval-style loading (base + unmerged adapter) agrees
    from tunekit.models.trained import load_any

    model, tok2 = load_any(str(second.path))
    assert len(tok2) == len(tok)
    assert torch.allclose(_logits(model, ids), trained, atol=1e-4)


@pytest.mark.slow
def test_dry_run_on_a_run_dir_counts_on_meta(sft_runs, capsys):
    from tunekit.stages.common import dry_run

    first, second = sft_runs
    recipe = load_recipe(None, [f"model.name={second.path}", "adapter.r=4"])
    meta = build_meta_model(recipe.model)
    assert meta.get_input_embeddings().weight.device.type == "meta"
    assert meta.get_input_embeddings().weight.shape[0] == len(load_tokenizer(recipe.model))
    trainable = dry_run(recipe)
    real = attach(load_model(recipe.model, load_tokenizer(recipe.model)), recipe.adapter, AttachContext())
    assert trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert "trainable parameters" in capsys.readouterr().out


@pytest.mark.slow
def test_4bit_chain_folds_in_16bit_then_quantizes(sft_runs):
    pytest.importorskip("bitsandbytes")
    first, _ = sft_runs
    tok = load_tokenizer(ModelConfig(name=str(first.path)))
    ids = _ids(tok)
    full = _logits(load_model(ModelConfig(name=str(first.path)), tok), ids)
    q = load_model(ModelConfig(name=str(first.path), load_in_4bit=True), tok)
    assert any("Linear4bit" in type(m).__name__ for m in q.modules())
    got = _logits(q, ids)
    err = (got - full).abs().max().item()
    assert 0 < err < 0.5 * full.abs().max().item(), err  # 4-bit rounding of the folded weights, not of the base


def test_full_finetune_run_loads_directly(tmp_path, tiny_model_dir, tiny_model_dir_b):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(tiny_model_dir_b, run / "model")
    (run / "recipe.yaml").write_text(f"model:\n  name: {tiny_model_dir}\nadapter:\n  method: none\n")
    cfg = ModelConfig(name=str(run))
    model = load_model(cfg, load_tokenizer(cfg))
    x = batch(1)
    assert torch.equal(_logits(model, x), _logits(load(tiny_model_dir_b), x))
    assert chain_of(cfg) == [{"path": str(run.resolve()), "kind": "full", "model": str((run / "model").resolve())}]


def test_merge_of_a_chained_run_folds_the_whole_chain(tmp_path, tiny_model_dir):
    """run A (LoRA on the base) -> run B (SVFT on A's result); `tunekit merge` of B = load_model(B)."""
    from tunekit.merge.adapters import merge_adapter
    from tunekit.merge.io import SafetensorsFolder

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    torch.manual_seed(0)
    cfg_a = AdapterConfig(r=4, dropout=0.0)
    model = attach(load(tiny_model_dir), cfg_a, AttachContext())
    train_steps(model, steps=2)
    save_adapter(model, cfg_a, run_a / "adapter")
    (run_a / "recipe.yaml").write_text(f"model:\n  name: {tiny_model_dir}\n")
    cfg_b = AdapterConfig(method="svft", r=4, svft={"pattern": "banded", "d": 1})
    model = attach(fold_adapter(load(tiny_model_dir), run_a / "adapter"), cfg_b, AttachContext())
    train_steps(model, steps=2, seed=5)
    with torch.no_grad():
        trained = model(batch(2)).logits
    save_adapter(model, cfg_b, run_b / "adapter")
    (run_b / "recipe.yaml").write_text(f"model:\n  name: {run_a}\n  dtype: float32\n")
    chained = load_model(ModelConfig(name=str(run_b), dtype="float32"))
    assert torch.allclose(_logits(chained, batch(2)), trained, atol=1e-4)
    merged = SafetensorsFolder(merge_adapter(None, run_b, tmp_path / "m", progress=False, log=print))
    state = chained.state_dict()
    for name in merged.names():
        assert torch.allclose(merged.read(name, dtype=torch.float32), state[name], atol=1e-5), name
    # the SVFT adapter is checked against the folded base: on the plain base it is refused
    from tunekit.errors import TunekitError

    with pytest.raises(TunekitError, match="fingerprint"):
        load_adapter(load(tiny_model_dir), run_b / "adapter")


@pytest.mark.slow
def test_dpo_on_an_sft_run_references_the_folded_model(sft_runs, tmp_path):
    """sft -> dpo: the policy starts from the folded sft result, and the reference (the adapter disabled: one
    copy of the weights) is that same folded model, so the step-0 DPO loss is log 2."""
    from test_preference_stages import PAIRS, _base_storages, _stage_context

    from tunekit.stages.dpo import DPOStage

    first, _ = sft_runs
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:8])
    recipe = load_recipe(None, [f"model.name={first.path}", f"data.train={pairs}", "train.batch_size=4",
                                "train.max_steps=1", "adapter.dropout=0", "adapter.r=4"], defaults={"stage": "dpo"})
    stage = DPOStage()
    ctx = _stage_context(stage, recipe, tmp_path)
    assert [link["path"] for link in ctx.model.tunekit_chain] == [str(first.path.resolve())]
    storages = _base_storages(ctx.model)
    trainer = stage.build_trainer(ctx)
    assert trainer.ref_model is None and _base_storages(trainer.model) == storages
    tok = ctx.tokenizer
    ids = _ids(tok)
    folded = load_model(ModelConfig(name=str(first.path)), tok)
    with trainer.model.disable_adapter():
        assert torch.allclose(_logits(trainer.model, ids), _logits(folded, ids), atol=1e-5)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model.eval(), dict(batch))
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["grpo", "rloo"])
def test_full_finetune_rl_on_an_sft_run_references_the_folded_model(sft_runs, tmp_path, stage_name):
    """sft -> grpo/rloo with full fine-tuning and β > 0: the frozen reference is the folded sft result (what the
    policy starts from), not the sft run's base that TRL would rebuild from config.name_or_path."""
    from test_preference_stages import _stage_context

    from tunekit.stages.grpo import GRPOStage
    from tunekit.stages.rloo import RLOOStage

    first, _ = sft_runs
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["instruction"]} for r in QA])
    recipe = load_recipe(None, [f"model.name={first.path}", f"data.train={prompts}", "adapter.method=none",
                                f"{stage_name}.beta=0.1", f"{stage_name}.num_generations=2", "train.batch_size=2",
                                "train.max_steps=1", "rewards=[{name: length, max: 20}]"],
                         defaults={"stage": stage_name})
    stage = GRPOStage() if stage_name == "grpo" else RLOOStage()
    ctx = _stage_context(stage, recipe, tmp_path)
    trainer = stage.build_trainer(ctx)
    assert trainer.beta == pytest.approx(0.1) and trainer.ref_model is not None
    ids = _ids(ctx.tokenizer)
    folded = load_model(ModelConfig(name=str(first.path)), ctx.tokenizer)
    assert torch.allclose(_logits(trainer.ref_model, ids), _logits(folded, ids), atol=1e-5)
