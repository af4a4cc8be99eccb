"""Preference and prompt-only records: every accepted shape, and file:line errors for the rest."""

from __future__ import annotations

import pytest

from tests.helpers import write_jsonl
from tunekit.data.preference import parse_hh, to_preference, to_prompt
from tunekit.errors import TunekitError

U, A = "user", "assistant"


def test_explicit_prompt_strings_and_margin():
    p = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5}, "auto", "f:1")
    assert p.prompt == [{"role": U, "content": "2+2?"}]
    assert p.chosen == [{"role": A, "content": "4"}] and p.rejected == [{"role": A, "content": "5"}]
    assert p.as_row()["margin"] == 1.5


def test_hh_transcripts_split_at_the_last_assistant_turn():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: no idea"
    p = to_preference({"chosen": c, "rejected": r}, "auto", "f:3")
    assert [m["content"] for m in p.prompt] == ["hi", "hello", "2+2?"]
    assert p.chosen == [{"role": A, "content": "4"}] and p.rejected[0]["content"] == "no idea"


def test_ultrafeedback_layout_prompt_plus_transcripts():
    rec = {"prompt": "Name a color.",
           "chosen": [{"role": U, "content": "Name a color."}, {"role": A, "content": "Blue."}],
           "rejected": [{"role": U, "content": "Name a color."}, {"role": A, "content": "No."}]}
    p = to_preference(rec, "auto", "f:1")
    assert p.prompt == [{"role": U, "content": "Name a color."}] and p.chosen[0]["content"] == "Blue."


@pytest.mark.parametrize("rec, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "do not share a prompt"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "x"}, "field 'chosen' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
    ({"prompt": "q", "chosen": "a"}, "not a preference record"),
    ({"chosen": [{"role": U, "content": "q"}], "rejected": [{"role": U, "content": "q"}, {"role": A, "content": "x"}]},
     "must end with an assistant turn"),
])
def test_bad_pairs_name_the_record(rec, message):
    with pytest.raises(TunekitError, match=message) as err:
        to_preference(rec, "auto", "pairs.jsonl:7")
    assert str(err.value).startswith("pairs.jsonl:7: ")


def test_parse_hh_rejects_other_text():
    with pytest.raises(TunekitError, match="transcript"):
        parse_hh("just text", "f:1", "chosen")


def test_prompt_records_keep_other_columns():
    r = to_prompt({"prompt": "What is 2+3?", "answer": "#### 5", "tests": ["assert f() == 1"]}, "auto", "f:1")
    assert r.prompt == [{"role": U, "content": "What is 2+3?"}]
    assert r.columns == {"answer": "#### 5", "tests": ["assert f() == 1"]}
    m = to_prompt({"messages": [{"role": U, "content": "hi"}, {"role": A, "content": "hello"}]}, "auto", "f:2")
    assert m.prompt == [{"role": U, "content": "hi"}] and m.columns["reference"] == "hello"
    g = to_prompt({"question": "Q?", "answer": "A #### 1"}, "auto", "f:3")
    assert g.prompt[0]["content"] == "Q?" and "question" not in g.columns
    with pytest.raises(TunekitError, match="f:4: no prompt"):
        to_prompt({"text": "x"}, "auto", "f:4")


def test_stage_data_carves_eval_and_reports_file_line(tmp_path):
    from tunekit.config.schema import DataConfig
    from tunekit.data.preference import split_records

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    split = split_records(DataConfig(train=str(path), eval_split=0.25), 0, to_preference)
    assert len(split.train) == 15 and len(split.eval) == 5
    assert {p.prompt[0]["content"] for p in split.train}.isdisjoint({p.prompt[0]["content"] for p in split.eval})
    write_jsonl(path, rows[:3] + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(TunekitError, match=r"p.jsonl:4: 'chosen' and 'rejected' are identical"):
        split_records(DataConfig(train=str(path)), 0, to_preference)
