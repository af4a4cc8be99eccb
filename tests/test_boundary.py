"""The one error boundary (tunekit/cli/common.py, tunekit/errors.py): corrupt or undecodable user files become
one `error: <file>[:<line>]` line with exit code 2; any other crash becomes one line naming a log file that
holds the traceback (in the run directory when there is one); `--debug` shows it on the terminal."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from tunekit import errors
from tunekit.cli.common import user_errors
from tunekit.errors import TunekitError, describe_file_error, reading


def _app(fn) -> typer.Typer:
    app = typer.Typer()
    app.command()(user_errors(fn))
    return app


def test_file_errors_are_named_with_their_line(tmp_path):
    bad_json = tmp_path / "a.json"
    bad_json.write_text('{\n  "x": 1,\n  oops\n}\n')
    with pytest.raises(TunekitError, match=r"a\.json:3: invalid JSON"), reading(bad_json):
        json.loads(bad_json.read_text())
    latin = tmp_path / "t.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(TunekitError, match=r"t\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"), reading(latin):
        latin.read_text(encoding="utf-8")
    cut = tmp_path / "w.safetensors"
    cut.write_bytes(b"\xff" * 7)
    from safetensors.torch import load_file

    with pytest.raises(TunekitError, match=r"w\.safetensors: corrupt or truncated"), reading(cut):
        load_file(cut)
    import jinja2

    with pytest.raises(TunekitError, match=r"tpl\.jinja:2: invalid Jinja template"), reading(tmp_path / "tpl.jinja"):
        jinja2.Environment().from_string("ok\n{% for x in y %}{{ x }\n")
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    import pyarrow.parquet as pq

    with pytest.raises(TunekitError, match=r"d\.parquet: corrupt or unreadable"), reading(parquet):
        pq.read_table(parquet)
    with pytest.raises(ZeroDivisionError), reading(parquet):  # not a file problem: not disguised as one
        _ = 1 / 0
    assert describe_file_error(KeyError("x")) is None


def test_undecodable_error_without_a_marker_still_exits_2():
    def cmd() -> None:
        b"\xff".decode("utf-8")

    res = CliRunner().invoke(_app(cmd), [])
    assert res.exit_code == 2 and res.stderr.startswith("error: input: not UTF-8 text")
    assert "Traceback" not in res.stderr


def test_a_crash_names_its_log_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def cmd() -> None:
        {}["missing"]

    monkeypatch.setenv("TUNEKIT_DEBUG", "0")
    res = CliRunner().invoke(_app(cmd), [])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error (KeyError: 'missing'); traceback in ")
    log = lines[0].split("traceback in ")[1].split(" ")[0]
    assert log.startswith(str(tmp_path)) and "Traceback" in open(log).read() and "{}[\"missing\"]" in open(log).read()
    monkeypatch.setenv("TUNEKIT_DEBUG", "1")
    res = CliRunner().invoke(_app(cmd), [])
    assert res.exit_code == 1 and "Traceback" in res.stderr and "KeyError" in res.stderr


def test_a_crash_during_a_run_logs_into_the_run_directory(tmp_path):
    run = tmp_path / "r.partial"

    def cmd() -> None:
        run.mkdir()
        errors.set_log_dir(run)
        raise RuntimeError("a bug")

    res = CliRunner().invoke(_app(cmd), [])
    assert res.exit_code == 1 and f"traceback in {run / 'crash.log'}" in res.stderr
    assert "RuntimeError: a bug" in (run / "crash.log").read_text()


def test_root_debug_flag(tmp_path, monkeypatch):
    from tunekit.cli.app import app

    monkeypatch.setenv("TUNEKIT_DEBUG", "0")  # restored after the test: --debug sets it for the process
    res = CliRunner().invoke(app, ["--debug", "sft", "--set", "train.lr=.nan"])
    assert res.exit_code == 2 and "Traceback" in res.stderr and res.stderr.strip().splitlines()[-1].startswith(
        "error: --set train.lr")
