"""One model resolver for every command (tunekit/models/resolve.py): a path is never sent to the hub, an
unreachable or offline hub fails at once, and the error names every place that was tried."""

from __future__ import annotations

import socket

import pytest

from tests.contract import refused
from tests.helpers import QA, write_jsonl
from tunekit.errors import TunekitError
from tunekit.models.resolve import looks_like_path, resolve_model

PAIRS = [{"prompt": f"What is {a} plus 1?", "chosen": f"{a + 1}", "rejected": f"{a + 2}"} for a in range(4)]


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nobody listens on: a hub endpoint there refuses at once, like a machine with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world(tmp_path, monkeypatch, tiny_model_dir):
    (tmp_path / "runs").mkdir()
    write_jsonl(tmp_path / "train.jsonl", QA)
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEKIT_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, expected", [
    ("runs/sft", True),  # its parent folder runs/ exists here
    ("./x", True), ("/abs/model", True), ("~/m", True), ("model.gguf", True), ("a/b/c", True),
    ("org/name", False), ("gpt2", False), ("Qwen/Qwen2.5-0.5B", False),
])
def test_what_looks_like_a_path(world, name, expected):
    assert looks_like_path(name) is expected


def test_a_mistyped_path_is_never_sent_to_the_hub(world, monkeypatch):
    def no_network(*_a, **_k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the hub was asked about a path")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(TunekitError) as err:
        resolve_model("runs/sft")
    msg = str(err.value)
    for place in ("local folder", "alias", "run directory", "hub cache and hub (not asked: 'runs/sft' is a path)"):
        assert place in msg, msg


def test_offline_hub_fails_at_once_naming_what_was_tried(world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunekitError) as err:
        resolve_model("nosuchorg/nosuchmodel")
    msg = str(err.value)
    assert "hub cache (" in msg and "not cached" in msg and "HF_HUB_OFFLINE is set" in msg, msg


def test_unreachable_hub_fails_at_once(world, monkeypatch, closed_port):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(TunekitError) as err:
        resolve_model("nosuchorg/nosuchmodel")
    assert f"hub (http://127.0.0.1:{closed_port} unreachable" in str(err.value)


def test_existing_folder_alias_order(world, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    (world / "nocfg").mkdir()
    with pytest.raises(TunekitError, match="has no config.json"):
        resolve_model("nocfg")


@pytest.mark.parametrize("command", ["dpo", "sft", "eval", "merge", "quantize"])
def test_every_command_fails_fast_on_a_mistyped_model_path(world, monkeypatch, closed_port, command,
                                                            tiny_model_dir):
    """The issue's case: `runs/sft` that does not exist, no network. Every command: one line, exit 2, < 1 s
    (was ~55 s of hub retries for dpo and eval)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    data = "pairs.jsonl" if command == "dpo" else "train.jsonl"
    args = {
        "dpo": ["dpo", "--set", "model.name=runs/sft", "--set", f"data.train={data}", "--output", "out"],
        "sft": ["sft", "--set", "model.name=runs/sft", "--set", f"data.train={data}", "--output", "out"],
        "eval": ["eval", "runs/sft", "--data", data, "--no-generate"],
        "merge": ["merge", "runs/sft", str(tiny_model_dir), "--method", "linear", "--output", "out"],
        "quantize": ["quantize", "runs/sft", "--format", "gguf", "--output", "out.gguf"],
    }[command]
    refused(args, world)  # warm the imports: the timing below is the resolver's, not Python's first import
    line, seconds = refused(args, world)
    assert "runs/sft" in line, line
    assert seconds < 1.0, (seconds, line)
