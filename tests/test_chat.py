"""`tunekit chat`: a real terminal (pexpect), the non-interactive modes, and a .gguf target."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from typer.testing import CliRunner

from tests.helpers import QA, ROOT, write_jsonl
from tunekit.cli.app import app


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA SFT run directory (two steps)."""
    from tunekit.config import load_recipe
    from tunekit.stages.sft import run_sft

    tmp = tmp_path_factory.mktemp("chatrun")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    return run_sft(load_recipe(None, [f"model.name={tiny_model_dir}", f"data.train={data}", f"output={tmp / 'run'}",
                                      "train.max_steps=2", "train.save_steps=0", "generate.samples=0"])).path


def _spawn(args: list[str], tmp_path, columns: int = 80):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEKIT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    child = pexpect.spawn(sys.executable, ["-m", "tunekit", "chat", *map(str, args)], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, columns))
    child.expect("chatting with")
    child.expect_exact(">>> ")
    return child


def _cli(args: list[str], stdin: str | None = None):
    result = CliRunner().invoke(app, ["chat", *map(str, args)], input=stdin)
    return result


def test_terminal_session_streams_stops_saves_and_resets(chat_run, tmp_path):
    child = _spawn([chat_run, "--temperature", "0", "--max-new-tokens", "4000"], tmp_path)
    # a long answer: text shows up while the model is still generating, and Ctrl-C stops only the answer
    child.sendline("Tell me a long story.")
    child.expect_exact("Tell me a long story.")
    child.expect(r"[^\s>]")  # the first streamed characters of the answer
    t_first = time.perf_counter()
    child.sendintr()
    child.expect_exact("[stopped]")
    assert time.perf_counter() - t_first < 60
    child.expect_exact(">>> ")
    # the session is alive: settings, a complete short answer, /save, /reset
    child.sendline("/params max_new_tokens=6 temperature=0")
    child.expect("max_new_tokens=6")
    child.expect_exact(">>> ")
    child.sendline("Say hello.")
    child.expect_exact(">>> ")
    saved = tmp_path / "conv.jsonl"
    child.sendline(f"/save {saved}")
    child.expect(r"saved 1 turns")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.expect_exact(">>> ")
    child.sendline(f"/save {saved}")
    child.expect(r"saved 0 turns")
    child.expect_exact(">>> ")
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.sendline("/exit")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "cache" / "chat_history").read_text().count("Say hello.") == 1

    # the interrupted turn was not kept; the saved conversation is training data for tunekit
    from transformers import AutoTokenizer

    from tunekit.data.formats import to_messages
    from tunekit.data.sources import read_source
    from tunekit.data.templates import tokenize_conversation

    records = read_source(str(saved))
    first = to_messages(records[0].data, "auto", records[0].where)
    assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == "Say hello."
    assert first[1]["content"].strip()
    tok = AutoTokenizer.from_pretrained(str(chat_run / "adapter"))
    example = tokenize_conversation(tok, first, 256)
    assert example.dropped is None and any(label != -100 for label in example.labels)


@pytest.mark.slow  # a second terminal session (~30 s); --compare is also checked without a terminal below
def test_terminal_compare_side_by_side(chat_run, tiny_model_dir, tmp_path):
    child = _spawn([chat_run, "--compare", tiny_model_dir, "--temperature", "0", "--max-new-tokens", "8"], tmp_path,
                   columns=160)
    child.sendline("Capital of France?")
    child.expect_exact("A: ")
    child.expect_exact("B: ")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(__import__("pexpect").EOF)


def test_prompt_and_stdin_modes(chat_run, tiny_model_dir):
    args = [chat_run, "--temperature", "0", "--max-new-tokens", "6", "--json"]
    one = _cli([*args, "--prompt", "Say hello."])
    assert one.exit_code == 0, one.output
    answer = json.loads(one.stdout.strip().splitlines()[-1])["answer"]
    lines = "Say hello.\n" + json.dumps([{"role": "user", "content": "Say hello."}]) + "\n" + json.dumps("Bye") + "\n"
    many = _cli(args, stdin=lines)
    assert many.exit_code == 0, many.output
    records = [json.loads(x) for x in many.stdout.strip().splitlines()]
    assert len(records) == 3 and records[0]["answer"] == records[1]["answer"] == answer
    # --compare without a wide terminal: one answer after the other, each labelled
    both = _cli([chat_run, "--compare", tiny_model_dir, "--temperature", "0", "--max-new-tokens", "4", "-p", "Hi"])
    assert both.exit_code == 0 and "[A: " in both.stdout and "[B: " in both.stdout, both.output
    bad = _cli(args, stdin='[{"role": "user"}]\n')
    assert bad.exit_code == 2 and "<stdin>:1:" in bad.output


def test_gguf_target_answers_like_transformers(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.quantize.gguf_writer import write_gguf

    gguf = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "F32") and tmp_path / "tiny.gguf"
    args = ["--temperature", "0", "--max-new-tokens", "8", "--json", "-p", "What is the capital of France?"]
    hf = _cli([tiny_model_dir, *args])
    cpp = _cli([gguf, *args])
    assert hf.exit_code == 0 and cpp.exit_code == 0, hf.output + cpp.output
    a = json.loads(hf.stdout.strip().splitlines()[-1])["answer"]
    b = json.loads(cpp.stdout.strip().splitlines()[-1])["answer"]
    assert a and a == b  # F32 GGUF logits match transformers: greedy answers are the same


def test_llama_backend_stops_at_end_of_turn(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from tunekit.chat.backends import TransformersBackend, load_backend
    from tunekit.quantize.gguf_writer import write_gguf

    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "F32")
    backend = load_backend(str(tmp_path / "tiny.gguf"))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    try:
        assert backend.is_stop(tok.convert_tokens_to_ids("<|im_end|>"))
        assert not backend.is_stop(tok.convert_tokens_to_ids("<|im_start|>"))
        msgs = [{"role": "user", "content": "Hi"}]
        assert backend.prompt_ids(msgs) == TransformersBackend(str(tiny_model_dir)).prompt_ids(msgs)
    finally:
        backend.close()


def test_bad_options_are_one_error_line(tiny_model_dir):
    res = _cli([tiny_model_dir, "--top-p", "2", "-p", "x"])
    assert res.exit_code == 2 and "error: --top-p" in res.output
    res = _cli([tiny_model_dir.parent / "missing.gguf", "-p", "x"])
    assert res.exit_code == 2 and "error:" in res.output


def test_gguf_without_a_chat_template_is_refused(tmp_path):
    pytest.importorskip("llama_cpp")
    from tunekit.models.tiny import build_tiny_model
    from tunekit.quantize.gguf_writer import write_gguf

    write_gguf(build_tiny_model(tmp_path / "m", chat_template=None), tmp_path / "m.gguf", "F32")
    res = _cli([tmp_path / "m.gguf", "-p", "x"])
    assert res.exit_code == 2 and "no embedded chat template" in res.output, res.output


@pytest.mark.slow
def test_embedded_model_same_first_tokens_and_stops(tmp_path):
    """SmolLM2-135M-Instruct (the `smollm2-135m` alias) and its `tunekit quantize` export (Q8_0 GGUF): the same
    greedy start through `tunekit chat` on both, both stop on their own, and the exported Modelfile's template
    renders the demo prompts as the Jinja template does."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from tunekit.models.load import resolve_model_path
    from tunekit.quantize.api import quantize
    from tunekit.quantize.modelfile import jinja_render, translate

    gguf = tmp_path / "smollm2.gguf"
    quantize("smollm2-135m", "gguf", gguf, progress=False, strict=True)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m")))
    family = translate(tok)
    assert family is not None and f'TEMPLATE """{family.go}"""' in (tmp_path / "smollm2.Modelfile").read_text()
    for prompt in ("What is the capital of France?", "What is 2 + 2?"):
        messages = [{"role": "user", "content": prompt}]
        assert family.mirror(messages) == jinja_render(tok, messages)
        args = ["--temperature", "0", "--max-new-tokens", "64", "--json", "-p", prompt]
        hf, cpp = _cli(["smollm2-135m", *args]), _cli([gguf, *args])
        assert hf.exit_code == 0 and cpp.exit_code == 0, hf.output + cpp.output
        a = json.loads(hf.stdout.strip().splitlines()[-1])["answer"]
        b = json.loads(cpp.stdout.strip().splitlines()[-1])["answer"]
        assert a.split()[:3] == b.split()[:3], (a, b)
        assert len(a.split()) < 45 and len(b.split()) < 45  # stopped at <|im_end|>, not at the token budget
