"""The output guard (tunekit/run/guard.py, atomic.py, rundir.py): refusals before work, the exclusive lock with
stale-owner takeover, parents made only at commit, and what two writers and a killed writer leave behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import QA, ROOT, run_cli, write_jsonl
from tunekit.errors import TunekitError
from tunekit.run import guard
from tunekit.run.atomic import atomic_output, staging_path


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "locks"
    monkeypatch.setenv("TUNEKIT_LOCK_DIR", str(d))
    return d


def _refused(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(TunekitError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_check_refuses_before_creating_anything(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _refused(guard.check, data, [data], True, match="is an input")
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    _refused(guard.check, link, [data], True, match="is an input")  # the same file, spelled otherwise
    _refused(guard.check, tmp_path, [data], True, match="contains the input")
    _refused(guard.check, model / "config.json", [model], True, match="lies inside the input")
    _refused(guard.check, model / "deep" / "er" / "x", [model], False, match="lies inside the input")
    _refused(guard.check, data, [], False, match="already exists; pass --overwrite")
    _refused(guard.check, data / "x", [], False, match="is a file, not a folder")
    _refused(guard.check, Path("/proc/tunekit/out"), [], False, match="cannot write")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    _refused(guard.check, tmp_path / "repo", [], True, match="a git checkout")
    _refused(guard.check, Path.home(), [], True, match="your home folder")
    _refused(guard.check, Path.cwd().parent, [], True, match="the current folder or one above it")
    guard.check(mine, [data], True)  # a user's folder given as output with --overwrite: replaced on commit
    link.unlink()
    shutil.rmtree(tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # what is allowed: a hub id as input, a replaced model folder, an empty folder, a new nested path
    assert guard.check(tmp_path / "new" / "out", ["org/model", data], False) == tmp_path / "new" / "out"
    guard.check(model, [data], True)
    (tmp_path / "empty").mkdir()
    guard.check(tmp_path / "empty", [], True)
    assert not (tmp_path / "new").exists()


def test_parents_made_only_at_commit_and_failure_leaves_nothing(tmp_path, lock_dir):
    out = tmp_path / "a" / "b" / "out"
    with atomic_output(out) as tmp:
        assert not (tmp_path / "a").exists()  # staged in the nearest existing folder
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tunekit-tmp-")
        (tmp / "w.txt").write_text("1")
    assert (out / "w.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "locks"]
    assert not list(lock_dir.iterdir())
    # a failing writer: no staging leftover, no parents, no lock, the old output intact
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "x" / "y", overwrite=True) as tmp:
        (tmp / "half").write_text("...")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "locks"] and not list(lock_dir.iterdir())
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True) as tmp:
        raise RuntimeError("boom")
    assert (out / "w.txt").read_text() == "1"


HOLDER = """
import sys, time
from tunekit.run.atomic import atomic_output
with atomic_output(sys.argv[1], overwrite=True) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    (tmp / "config.json").write_text("{}")
print("done", flush=True)
"""


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
    return proc


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _holder(out, 60)
    try:
        message = _refused(guard.acquire, out, [], True, match="is being written by pid")
        assert f"pid {holder.pid}" in message
        # the staging folder of the live writer is untouched by the refused one
        assert (staging_path(out) / "part.bin").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)  # a hard kill: its lock file stays, its flock dies with it
        holder.wait()
    assert guard.lock_file_for(out).is_file() and not out.exists()
    assert json.loads(guard.lock_file_for(out).read_text())["pid"] == holder.pid
    with atomic_output(out, overwrite=True) as tmp:  # taken over; the dead writer's half output discarded
        assert not (tmp / "part.bin").exists()
        (tmp / "config.json").write_text("{}")
    err = capsys.readouterr().err
    assert "took over the lock" in err and f"process {holder.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert not staging_path(out).exists() and not guard.lock_file_for(out).exists()


def test_nested_lock_in_one_process_is_shared(tmp_path, lock_dir):
    out = tmp_path / "o"
    outer = guard.lock(out)
    inner = guard.lock(out)  # a stage calling a library function that locks the same output
    assert inner is outer
    inner.release()
    assert guard.lock_file_for(out).exists()
    outer.release()
    assert not list(lock_dir.iterdir())


@pytest.mark.slow  # several tunekit subprocesses (~20-40 s on an idle 2-core machine)
def test_two_real_merges_on_one_output(tmp_path, tiny_model_dir, tiny_model_dir_b):
    """A real merge started while another writer holds the output is refused with the holder's pid; the first
    writer's result is what ends up there, complete."""
    out = tmp_path / "merged"
    holder = _holder(out, 120)
    try:
        res = run_cli("merge", "--method", "linear", tiny_model_dir, tiny_model_dir_b, "-o", out, "--overwrite",
                      "--no-progress")
        assert res.returncode == 2, res.stderr
        assert f"is being written by pid {holder.pid}" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the writer died mid-write: the re-run takes its lock over, discards its staging folder and completes
    res = run_cli("merge", "--method", "linear", tiny_model_dir, tiny_model_dir_b, "-o", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "took over the lock" in res.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not staging_path(out).exists()


@pytest.mark.slow  # several tunekit subprocesses (~20-40 s on an idle 2-core machine)
def test_sft_killed_before_its_first_checkpoint_blocks_nothing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "runs" / "r"
    args = ["sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={data}", "--set",
            "train.max_steps=2", "--set", "train.save_steps=0", "--set", "generate.samples=0", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "tunekit", *args[:-2], "--set", "train.max_steps=100000",
                             "--output", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    partial = out.with_name("r.partial")
    deadline = time.time() + 300
    while time.time() < deadline and not (partial / "recipe.yaml").is_file():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.is_dir() and not out.exists()
    res = run_cli(*args)  # no --resume, no --overwrite: the dead run left nothing worth keeping
    assert res.returncode == 0, res.stderr
    assert "discarding the unfinished run" in res.stderr and "took over the lock" in res.stderr
    assert (out / "adapter").is_dir() and not partial.exists()


def test_failed_sft_removes_its_partial_and_parents(tmp_path, tiny_model_dir):
    """A run that fails before its first checkpoint (here: the model's weights are non-finite) leaves no
    `.partial` and no parent folder behind, so the corrected re-run is not blocked."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "new" / "deep" / "r"
    res = run_cli("sft", "--set", f"model.name={bad}", "--set", f"data.train={data}", "--set", "train.max_steps=2",
                  "--set", "generate.samples=0", "--output", out)
    assert res.returncode == 3, res.stderr
    assert "non-finite" in res.stderr and "no checkpoint was saved" in res.stderr
    assert not (tmp_path / "new").exists()
