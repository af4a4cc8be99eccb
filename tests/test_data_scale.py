"""The data path at scale: streamed readers with file:line errors for undecodable, truncated and corrupt files,
a UTF-8 BOM accepted, a .json records array found by parsing; the tokenization cache (a second build reads it,
changed data or template rebuild it) and a bad record deep in a file fails before anything is cached."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import QA, run_cli, write_jsonl
from tunekit.config.schema import DataConfig
from tunekit.data import pipeline
from tunekit.data.sources import iter_source, read_source
from tunekit.errors import TunekitError

BOM = b"\xef\xbb\xbf"


def _write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_utf8_bom_is_accepted_in_jsonl_json_and_csv(tmp_path):
    rec = {"instruction": "a", "output": "b"}
    assert read_source(_write(tmp_path / "a.jsonl", BOM + json.dumps(rec).encode() + b"\n"))[0].data == rec
    assert read_source(_write(tmp_path / "a.json", BOM + json.dumps([rec]).encode()))[0].data == rec
    assert read_source(_write(tmp_path / "a.csv", BOM + b"instruction,output\na,b\n"))[0].data == rec


def test_json_records_array_is_found_by_parsing(tmp_path):
    """A '[' inside an earlier string value, and other scalar keys, do not confuse the reader."""
    text = ('{"note": "see [1] and [2]", "version": 2,\n "data": [\n  {"instruction": "a", "output": "b"},\n'
            '  {"instruction": "c", "output": "d"}\n ]\n}\n')
    recs = read_source(_write(tmp_path / "d.json", text))
    assert [r.data["instruction"] for r in recs] == ["a", "c"]
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["3", "4"]
    with pytest.raises(TunekitError, match=r"arrays found: 'a', 'b'"):
        read_source(_write(tmp_path / "two.json", '{"a": [], "b": []}'))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("u.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n',
         "u.jsonl:2: not UTF-8 text (byte 0xff)"),
        ("t.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp',
         "t.jsonl:2: invalid JSON: Unterminated string"),
        ("t.json", b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "a"',
         "t.json:3: invalid JSON"),
        ("u.json", b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "\xe9t\xe9"}]',
         "u.json:3: not UTF-8 text"),
        ("u.csv", b"instruction,output\na,b\nc,d\n\xff,e\n", "u.csv:4: not UTF-8 text"),
        ("c.parquet", b"PAR1 this is not parquet", "c.parquet: not a readable parquet file"),
    ],
)
def test_undecodable_truncated_corrupt_files_name_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(TunekitError) as err:
        read_source(path)
    assert message in str(err.value)
    if name.startswith("t."):
        assert "truncated?" in str(err.value)


def test_reading_is_streamed(tmp_path):
    """Records before a bad line arrive before the error: the file is not read whole first."""
    path = _write(tmp_path / "s.jsonl", "".join(json.dumps(q) + "\n" for q in QA) + "{broken\n")
    it = iter_source(path)
    assert next(it).data == QA[0]
    with pytest.raises(TunekitError, match=r"s.jsonl:11: invalid JSON"):
        list(it)


def test_cli_reports_an_undecodable_file_in_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n\x89PNG\r\n\x1a\n\x00\x00')
    out = tmp_path / "run"
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={bad}", "--output", out,
                  "--set", f"output={out}")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bin.jsonl:2: not UTF-8 text (byte 0x89)" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_second_build_reads_the_cache_and_changes_rebuild(tmp_path, tiny_model_dir, cache_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "qa.jsonl", QA * 3)
    cfg = DataConfig(train=str(data), eval_split=0.2, max_length=64)
    first = pipeline.build_sft_data(cfg, tok, 0)
    assert not first.cached and len(list(cache_dir.iterdir())) == 1
    again = pipeline.build_sft_data(cfg, tok, 0)
    assert again.cached
    assert again.train["input_ids"] == first.train["input_ids"] and again.train["labels"] == first.train["labels"]
    assert again.stats == first.stats and again.eval_messages == first.eval_messages
    assert again.eval["input_ids"] == first.eval["input_ids"]
    # the cache holds exactly what a build without it gives
    fresh = pipeline.build_sft_data(cfg, tok, 0, cache=False)
    assert fresh.train["input_ids"] == first.train["input_ids"] and fresh.stats == first.stats
    # other seed, other template, changed file: new keys
    assert not pipeline.build_sft_data(cfg, tok, 1).cached
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert not pipeline.build_sft_data(cfg, tok, 0).cached
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    write_jsonl(data, QA * 2)
    changed = pipeline.build_sft_data(cfg, tok, 0)
    assert not changed.cached and changed.stats.train_records < first.stats.train_records
    assert changed.stats.fingerprint != first.stats.fingerprint
    assert len(list(cache_dir.iterdir())) == 4 and not list(cache_dir.glob("*.partial*"))


def test_bad_record_late_in_a_file_fails_and_caches_nothing(tmp_path, tiny_model_dir, cache_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(5000)] + [{"instruction": "x"}]
    data = write_jsonl(tmp_path / "late.jsonl", rows)
    with pytest.raises(TunekitError, match=r"late.jsonl:5001: missing field 'output'"):
        pipeline.build_sft_data(DataConfig(train=str(data), max_length=64), tok, 0)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_mixing_and_split_counts_on_many_records(tmp_path, tiny_model_dir, cache_dir):
    """5,000 records across two weighted sources: exact counts from index arrays, eval disjoint from train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "A"} for i in range(3000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "B"} for i in range(2000)])
    cfg = DataConfig(train=[{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2.0}],
                     eval_split=100, max_eval_samples=None, max_length=32)
    data = pipeline.build_sft_data(cfg, tok, 3)
    used = {s["path"]: s["used"] for s in data.stats.sources}
    held = {m[0]["content"] for m in data.eval_messages}
    assert len(held) == 100 == data.stats.eval_records
    n_a = sum(h.startswith("a") for h in held)
    assert used[str(a)] == round(0.5 * (3000 - n_a)) and used[str(b)] == 2 * (2000 - (100 - n_a))
    assert data.stats.train_records == used[str(a)] + used[str(b)]
    texts = set(tok.batch_decode(data.train["input_ids"][:2000]))
    assert not any(f"\n{h}<|im_end|>" in t for h in list(held)[:20] for t in texts)
    assert os.path.isdir(cache_dir)
