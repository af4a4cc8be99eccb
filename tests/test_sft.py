"""`tunekit sft` end to end on a tiny model: saved artefacts reload in plain PEFT/transformers with equal
logits, packing equals no packing per sequence, resume continues from the checkpoint, dry-run counts."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import QA, interrupt_after_checkpoint, run_cli, write_jsonl
from tunekit.config import load_recipe


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", QA)


def _recipe(model_dir, data, out, *extra):
    return load_recipe(None, [f"model.name={model_dir}", f"data.train={data}", f"output={out}",
                              "train.max_steps=3", "train.batch_size=2", "train.lr=1e-2", "train.save_steps=0",
                              "generate.samples=2", "generate.max_new_tokens=4", *extra])


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_run_reloads_in_plain_peft(tmp_path, tiny_model_dir, qa_file, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunekit.stages.sft import run_sft

    extra = ["train.report_to=[tensorboard]"] if method == "lora" else []
    result = run_sft(_recipe(tiny_model_dir, qa_file, tmp_path / "run", f"adapter.method={method}", *extra))
    run = result.path
    if method == "lora":
        assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "tensorboard logged nothing"
    for name in ("recipe.yaml", "run_card.json", "metrics.jsonl", "loss.png", "samples.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    card = json.loads((run / "run_card.json").read_text())
    assert card["finished"] and card["global_step"] == 3 and card["seed"] == 42
    assert card["versions"]["peft"] and len(card["data_fingerprint"]) == 16
    ids = _ids(tiny_model_dir)
    trained = _logits(result.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    reloaded = _logits(PeftModel.from_pretrained(base, run / "adapter"), ids)
    assert torch.equal(reloaded, trained)
    assert (trained - base_logits).abs().max() > 1e-3  # training moved the model
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["use_dora"] is (method == "dora") and cfg["r"] == 16


def test_full_finetune_saves_model(tmp_path, tiny_model_dir, qa_file):
    from transformers import AutoModelForCausalLM

    from tunekit.stages.sft import run_sft

    result = run_sft(_recipe(tiny_model_dir, qa_file, tmp_path / "run", "adapter.method=none", "train.lr=1e-3"))
    ids = _ids(tiny_model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(result.path / "model", dtype=torch.float32)
    assert torch.equal(_logits(reloaded, ids), _logits(result.model, ids))


def test_qlora_run_reloads_on_4bit_base(tmp_path, tiny_model_dir, qa_file):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunekit.stages.sft import run_sft

    result = run_sft(_recipe(tiny_model_dir, qa_file, tmp_path / "run", "model.load_in_4bit=true"))
    assert any("Linear4bit" in type(m).__name__ for m in result.model.modules())
    ids = _ids(tiny_model_dir)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32,
                                                device_map={"": "cpu"})
    reloaded = PeftModel.from_pretrained(base, result.path / "adapter")
    assert torch.allclose(_logits(reloaded, ids), _logits(result.model, ids), atol=1e-5)


def test_packing_gives_same_per_sequence_loss(tiny_model_dir, qa_file):
    """Padding-free packed batches (restarting position_ids) give each sequence the loss it has alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.config.schema import DataConfig
    from tunekit.data.collate import SFTCollator
    from tunekit.data.pipeline import build_sft_data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    packed = build_sft_data(DataConfig(train=str(qa_file), eval_split=0, max_length=64, packing=True), tok, 0)
    plain = build_sft_data(DataConfig(train=str(qa_file), eval_split=0, max_length=64), tok, 0)
    assert packed.stats.packed_rows < plain.stats.train_records
    ce = torch.nn.functional.cross_entropy

    def per_token(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        return ce(logits, labels, ignore_index=-100, reduction="none"), labels

    # unpacked: each example alone
    alone = {}
    for row in plain.train:
        loss, labels = per_token(SFTCollator(tok.pad_token_id)([row]))
        alone[tuple(row["input_ids"])] = loss[labels != -100]
    collate = SFTCollator(tok.pad_token_id, padding_free=True)
    batch = collate(list(packed.train))
    assert collate.padding_share == 0.0
    loss, labels = per_token(batch)
    ids = batch["input_ids"][0].tolist()
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    seen = 0
    for s, e in zip(starts, starts[1:]):
        seq = tuple(ids[s:e])
        mask = labels[s : e - 1] != -100
        got = loss[s : e - 1][mask]
        assert torch.allclose(got, alone[seq], atol=1e-5), seq
        seen += 1
    assert seen == plain.stats.train_records


def test_existing_output_is_not_overwritten(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={qa_file}", "--output", out)
    assert res.returncode == 2 and "already exists; pass --overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "run.partial").exists()


def test_overwrite_replaces_only_after_success(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={qa_file}",
                  "--set", "train.max_steps=1", "--set", "generate.samples=0", "--output", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_after_interrupt_continues_from_checkpoint(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    step = interrupt_after_checkpoint(
        ["sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={qa_file}", "--set",
         "train.max_steps=400", "--set", "train.save_steps=2", "--set", "train.save_total_limit=1", "--set",
         "generate.samples=0"], out)
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={qa_file}",
                  "--set", "train.max_steps=400", "--set", "train.save_steps=2", "--set", "train.save_total_limit=1",
                  "--set", "generate.samples=0", "--output", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{step}" in res.stderr
    card = json.loads((out / "run_card.json").read_text())
    assert card["global_step"] == 400
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step + 1 in logged  # the first step after the checkpoint is logged, training continued there


def test_resume_without_partial_is_an_error(tmp_path, tiny_model_dir, qa_file):
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={qa_file}",
                  "--output", tmp_path / "run", "--resume")
    assert res.returncode == 2 and "no interrupted run" in res.stderr


MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "head_dim": 128,
}


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral7b")
    (d / "config.json").write_text(json.dumps(MISTRAL_7B))
    return d


def _dry(mistral_dir, *sets):
    res = run_cli("sft", "--set", f"model.name={mistral_dir}", *[a for s in sets for a in ("--set", s)], "--dry-run")
    assert res.returncode == 0, res.stderr
    line = [x for x in res.stdout.splitlines() if x.startswith("trainable parameters: ")]
    assert len(line) == 1
    return int(line[0].split(": ")[1])


def test_dry_run_lora_count_matches_formula(mistral_dir):
    """LoRA adds r·(d_in + d_out) per target module: rank 64 over q,k,v,o,gate,up,down of Mistral-7B."""
    h, kv, inter, layers, r = 4096, 8 * 128, 14336, 32, 64
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + inter) * 2 + (inter + h))
    assert per_layer * layers == 167_772_160
    assert _dry(mistral_dir, "adapter.r=64") == 167_772_160
    targets = "adapter.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    assert _dry(mistral_dir, "adapter.r=64", targets) == 167_772_160
    assert _dry(mistral_dir, "adapter.r=8", "adapter.targets=[q_proj,v_proj]") == 8 * (2 * h + h + kv) * layers


def test_dry_run_dora_and_full_counts(mistral_dir):
    h, kv, inter, layers = 4096, 1024, 14336, 32
    magnitudes = (h + kv + kv + h + inter + inter + h) * layers
    assert _dry(mistral_dir, "adapter.r=64", "adapter.method=dora") == 167_772_160 + magnitudes
    vocab = 32000
    full = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    assert _dry(mistral_dir, "adapter.method=none") == full


def test_dry_run_reads_no_weights(tmp_path, tiny_model_dir):
    """A folder holding only config.json is enough (no tokenizer, no weights)."""
    only = tmp_path / "only"
    only.mkdir()
    (only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert _dry(only, "adapter.r=4", "adapter.targets=[q_proj]") == 4 * (64 + 64) * 2
