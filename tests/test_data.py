"""Data: every format to messages, mixing weights, eval split, truncation, assistant masks, bad records."""

from __future__ import annotations

import csv
import json

import pytest

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.config.schema import DataConfig, DataSource
from tunekit.data.formats import to_messages
from tunekit.data.pipeline import build_sft_data
from tunekit.data.sources import read_source
from tunekit.data.templates import tokenize_conversation
from tunekit.errors import TunekitError

EXPECTED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "Hi", "output": "Hello"}, "alpaca"),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca"),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
         "prompt_completion"),
        ({"messages": EXPECTED}, "messages"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "sharegpt"),
    ],
)
def test_formats_normalise(record, fmt):
    assert to_messages(record, fmt, "x:1") == EXPECTED
    assert to_messages(record, "auto", "x:1") == EXPECTED


def test_alpaca_input_and_system():
    msgs = to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be terse."}, "auto", "f:1")
    assert msgs == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sum\n\n1 2"},
                    {"role": "assistant", "content": "3"}]


def test_system_prompt_added_only_when_missing():
    msgs = to_messages({"prompt": "Hi", "completion": "Hello"}, "auto", "f:1", system_prompt="S")
    assert msgs[0] == {"role": "system", "content": "S"}


def test_readers_keep_line_numbers(tmp_path):
    text = '[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}\n]'
    (tmp_path / "a.json").write_text(text)
    recs = read_source(str(tmp_path / "a.json"))
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["2", "4"]
    with (tmp_path / "b.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["instruction", "output"], ["x", "y"], ["z", "w"]])
    recs = read_source(str(tmp_path / "b.csv"))
    assert recs[1].data == {"instruction": "z", "output": "w"} and recs[1].where.endswith(":3")


def test_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(QA[:3]), folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", QA[3:5])
    assert len(read_source(str(folder))) == 5


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**kw)


def test_mixing_weights_and_eval_split(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "A"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "B"} for i in range(10)])
    cfg = DataConfig(train=[DataSource(path=str(a), weight=0.5), DataSource(path=str(b), weight=2.0)],
                     eval_split=0, max_length=64)
    data = build_sft_data(cfg, tok, seed=1)
    used = {s["path"]: s["used"] for s in data.stats.sources}
    assert used == {str(a): 10, str(b): 20}
    assert data.stats.train_records == 30 and data.eval is None
    # the same records with a held-out split: eval comes from unique records and never from training
    cfg = DataConfig(train=[DataSource(path=str(a)), DataSource(path=str(b), weight=3.0)], eval_split=0.2,
                     max_length=64)
    data = build_sft_data(cfg, tok, seed=1)
    held = {m[0]["content"] for m in data.eval_messages}
    assert len(held) == 6
    train_prompts = {tok.decode(ids) for ids in data.train["input_ids"]}
    assert not any(f"\n{h}<|im_end|>" in t for h in held for t in train_prompts)
    # same seed → same split and fingerprint; other seed → another
    again = build_sft_data(cfg, tok, seed=1)
    other = build_sft_data(cfg, tok, seed=2)
    assert again.stats.fingerprint == data.stats.fingerprint != other.stats.fingerprint


def test_truncate_and_drop_are_counted(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"instruction": "short", "output": "ok"},
            {"instruction": "long answer", "output": "answer " * 40},  # truncation keeps part of the answer
            {"instruction": "long " * 40, "output": "x"}]  # truncation cuts the whole answer: nothing to learn
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    trunc = build_sft_data(DataConfig(train=str(path), eval_split=0, max_length=48), tok, 0)
    assert trunc.stats.truncated == 1 and trunc.stats.dropped_no_target == 1
    assert sorted(len(x) for x in trunc.train["input_ids"])[-1] == 48 and trunc.stats.train_records == 2
    drop = build_sft_data(DataConfig(train=str(path), eval_split=0, max_length=48, truncation="drop"), tok, 0)
    assert drop.stats.dropped_too_long == 2 and drop.stats.train_records == 1 and drop.stats.truncated == 0


def test_assistant_mask_equals_generation_markers(tiny_model_dir):
    """Our prefix-rendering mask equals transformers' {% generation %} mask on a template that has markers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello you"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok then"}]
    ours = tokenize_conversation(tok, conv, 512)
    ref = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours.input_ids == ref["input_ids"]
    assert [int(x != -100) for x in ours.labels] == ref["assistant_masks"]
    everything = tokenize_conversation(tok, conv, 512, train_on="all")
    assert everything.labels == everything.input_ids


@pytest.mark.embedded
def test_assistant_mask_on_real_smollm2_template():
    """SmolLM2's template has no generation markers and injects a system prompt; the mask still covers
    exactly each answer plus its <|im_end|>."""
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="smollm2-135m"))
    conv = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]
    t = tokenize_conversation(tok, conv, 512)
    learned = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != -100])
    assert learned == "Paris.<|im_end|>Madrid.<|im_end|>"
    assert tok.eos_token == "<|im_end|>"


def test_chatml_fallback_adds_tokens_for_base_models(tmp_path):
    """A base model without a chat template gets ChatML; missing <|im_start|>/<|im_end|> become special tokens
    and <|im_end|> the EOS, so the tuned model stops."""
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import load_model, load_tokenizer
    from tunekit.models.tiny import build_tiny_tokenizer

    base = tmp_path / "base"
    tok = build_tiny_tokenizer(chat_template=None)
    # drop the ChatML tokens from the vocab by training a tokenizer without them
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world base model"] * 4, trainers.BpeTrainer(vocab_size=300,
                            special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    tok.save_pretrained(base)
    from tunekit.models.tiny import tiny_llama_config

    AutoModelForCausalLM.from_config(tiny_llama_config(len(tok))).save_pretrained(base)
    cfg = ModelConfig(name=str(base))
    tok2 = load_tokenizer(cfg)
    assert tok2.eos_token == "<|im_end|>" and "<|im_start|>" in tok2.get_vocab()
    model = load_model(cfg, tok2)
    assert model.get_input_embeddings().weight.shape[0] == len(tok2) == len(tok) + 2
    assert model.tunekit_new_token_ids == [len(tok), len(tok) + 1]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "bad.jsonl:2: invalid JSON"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', "bad.jsonl:3: missing field 'output'"),
        ('{"instruction": "a", "output": 5}\n', "bad.jsonl:1: field 'output' must be a string, got int"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "bad.jsonl:1: messages[0].role must be one of"),
        ('[1, 2]\n', "bad.jsonl:1: expected a JSON object, got list"),
        ('{"text": "no format"}\n', "bad.jsonl:1: cannot tell the record format"),
    ],
)
def test_bad_records_exit_2_with_file_and_line(tmp_path, tiny_model_dir, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={bad}", "--output", out)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in res.stderr
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_missing_data_file_is_exit_2(tmp_path, tiny_model_dir):
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", "data.train=./nope.jsonl",
                  "--output", tmp_path / "run")
    assert res.returncode == 2 and "data file './nope.jsonl' not found" in res.stderr


def test_json_array_record_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}], indent=1))
    recs = read_source(str(p))
    with pytest.raises(TunekitError, match=r"a.json:6: missing field 'output'"):
        to_messages(recs[1].data, "auto", recs[1].where)
