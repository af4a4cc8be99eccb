"""Does the served model see the prompts the tuned model was trained on, and does it stop where it learned to?

Sample conversations are rendered twice: with the training template (the run's saved tokenizer and its
`model.chat_template`) and with the template the export will be served with: a GGUF's embedded
`tokenizer.chat_template` as llama-cpp-python serves it (Jinja) and as llama.cpp's built-in template engine
renders it (llama-cli, llama-server without --jinja), tokenized by llama.cpp; a folder's saved tokenizer. The
token-id sequences must be equal, and every end-of-turn token of the training template must be a stop token of
the served model (a GGUF's EOS/EOG tokens; `generation_config.json` `eos_token_id` for folders, what
transformers and vLLM stop at). A difference is what makes a tuned model "repeat itself" or never stop once
served.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

SAMPLE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@dataclass
class TemplateCheck:
    """The outcome of one comparison; `problems` is empty when training and serving agree."""

    served: str  # what was checked: a GGUF path or a folder
    engine: str  # who rendered the served template
    match: bool
    first_diff: int | None = None
    training_tokens: list[str] = field(default_factory=list)  # a few tokens from the first difference on
    served_tokens: list[str] = field(default_factory=list)
    end_of_turn: list[str] = field(default_factory=list)
    served_stops: list[int] = field(default_factory=list)
    missing_stops: list[str] = field(default_factory=list)
    also: list[TemplateCheck] = field(default_factory=list)  # other engines the same file is served by

    @property
    def notes(self) -> list[str]:
        """Differences under other engines the file may be served by (warnings, never errors: e.g. llama.cpp's
        built-in ChatML drops a default system message that the Jinja template inserts)."""
        out = []
        for other in self.also:
            other.served = self.served
            out.extend(other.problems)
        return out

    @property
    def problems(self) -> list[str]:
        """Differences in how the export is served by default (its own template, its stop tokens)."""
        out = []
        if not self.match:
            out.append(f"{self.served}: the served chat template ({self.engine}) renders a different prompt than "
                       f"the training template; first difference at token {self.first_diff}: training "
                       f"{self.training_tokens} vs served {self.served_tokens}")
        if self.missing_stops:
            out.append(f"{self.served}: end-of-turn token(s) {self.missing_stops} are not stop tokens of the "
                       f"served model (stops at ids {self.served_stops}); it will not stop after its answer")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"served": self.served, "engine": self.engine, "match": self.match, "first_diff": self.first_diff,
                "training_tokens": self.training_tokens, "served_tokens": self.served_tokens,
                "end_of_turn": self.end_of_turn, "served_stops": self.served_stops,
                "missing_stops": self.missing_stops, "also": [a.as_dict() for a in self.also],
                "notes": self.notes, "ok": not self.problems}


def sample_conversations(tok: Any) -> list[list[dict[str, str]]]:
    """SAMPLE with and without its system turn (templates may insert a default system message); only without
    when the template refuses system messages."""
    try:
        tok.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
        return [SAMPLE, SAMPLE[1:]]
    except Exception:
        return [SAMPLE[1:]]


def _trained_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    from tunekit.data.templates import render

    return list(tok(render(tok, messages, generation_prompt=True), add_special_tokens=False)["input_ids"])


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def training_tokenizer(source: str | Path) -> Any:
    """The tokenizer and chat template `source` (run, adapter, model folder or alias) was trained with."""
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import load_tokenizer

    return load_tokenizer(ModelConfig(name=str(source)))


# ------------------------------------------------------------------------------------------------ GGUF
JINJA_ENGINE = "llama-cpp-python chat handler (the embedded Jinja template)"
BUILTIN_ENGINE = "llama.cpp built-in templates (llama_chat_apply_template: llama-cli, llama-server without --jinja)"


def render_gguf(llm: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
    """Render `messages` with the GGUF's embedded `tokenizer.chat_template` the way llama-cpp-python serves it
    (its Jinja2 chat formatter, with the file's BOS/EOS texts; the prompt is then tokenized without an extra BOS).
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise TunekitError(f"'{llm.model_path}' has no embedded chat template (tokenizer.chat_template)")
    model = llm._model  # llama-cpp-python's own wrapper: the BOS/EOS texts it hands its formatter
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(template, model.token_get_text(eos) if eos != -1 else "",
                                    model.token_get_text(bos) if bos != -1 else "",
                                    add_generation_prompt=generation_prompt)
    return formatter(messages=messages).prompt


def render_gguf_builtin(llm: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
    """Render `messages` with llama.cpp's built-in template engine, which recognises the embedded template's
    family and renders that family's fixed format. An unrecognised template is a TunekitError."""
    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template") or ""
    keep = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))()
    for i, (role, content) in enumerate(keep):
        chat[i].role = role
        chat[i].content = content
    size = 4 * sum(len(r) + len(c) for r, c in keep) + 4096
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode("utf-8"), chat, len(keep), generation_prompt,
                                                buf, size)
        if n < 0:
            raise TunekitError("llama.cpp's built-in engine does not recognise the embedded chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8")
        size = n + 1
    raise TunekitError("llama.cpp chat template rendering did not fit its buffer")


def gguf_stop_ids(llm: Any) -> list[int]:
    """The ids llama.cpp ends generation at (EOS and every end-of-generation token)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def check_gguf(tok: Any, gguf: str | Path) -> TemplateCheck:
    """Compare the training tokenizer `tok` with how `gguf` is served by llama.cpp: the embedded Jinja
    template (llama-cpp-python) and llama.cpp's built-in template engine; and its stop tokens."""
    from tunekit.quantize import llamacpp

    llm = llamacpp.load(gguf, n_ctx=64, vocab_only=True, logits_all=False)
    try:
        return _check_gguf(tok, llm, gguf)
    finally:
        llm.close()


def _compare(tok: Any, llm: Any, render: Any, add_bos: bool, engine: str, gguf: Any) -> TemplateCheck:
    """The first sample conversation whose served ids differ from the training ids (else a match)."""
    for messages in sample_conversations(tok):
        trained = _trained_ids(tok, messages)
        try:
            text = render(llm, messages, True)
        except Exception as exc:  # a template this engine cannot render
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            return TemplateCheck(str(gguf), f"{engine}: {first}", False, 0, _pieces_hf(tok, trained[:4]),
                                 ["<not rendered>"])
        served = list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
        at = first_difference(trained, served)
        if at is not None:
            return TemplateCheck(str(gguf), engine, False, at, _pieces_hf(tok, trained[at:at + 4]),
                                 [llm.detokenize([i], special=True).decode("utf-8", "replace")
                                  for i in served[at:at + 4]])
    return TemplateCheck(str(gguf), engine, True)


def _check_gguf(tok: Any, llm: Any, gguf: str | Path) -> TemplateCheck:
    from tunekit.chat.serving import end_of_turn_tokens

    result = _compare(tok, llm, render_gguf, False, JINJA_ENGINE, gguf)
    builtin = _compare(tok, llm, render_gguf_builtin, True, BUILTIN_ENGINE, gguf)
    result.also = [builtin]
    result.served_stops = gguf_stop_ids(llm)
    result.end_of_turn = end_of_turn_tokens(tok)
    result.missing_stops = [t for t in result.end_of_turn if tok.convert_tokens_to_ids(t) not in result.served_stops]
    return result


def _pieces_hf(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


# ------------------------------------------------------------------------------------------------ folders
def check_folder(tok: Any, folder: str | Path) -> TemplateCheck:
    """Compare the training tokenizer `tok` with the tokenizer and generation config saved in `folder`."""
    from transformers import AutoTokenizer

    from tunekit.chat.serving import end_of_turn_tokens, folder_stop_ids

    served_tok = AutoTokenizer.from_pretrained(str(folder))
    stops = folder_stop_ids(folder)
    eot = end_of_turn_tokens(tok)
    missing = [t for t in eot if tok.convert_tokens_to_ids(t) not in stops]
    engine = "transformers (saved tokenizer)"
    for messages in sample_conversations(tok):
        trained = _trained_ids(tok, messages)
        if not served_tok.chat_template:
            return TemplateCheck(str(folder), "no chat template saved", False, 0, _pieces_hf(tok, trained[:4]), [],
                                 eot, stops, missing)
        served = _trained_ids(served_tok, messages)
        at = first_difference(trained, served)
        if at is not None:
            return TemplateCheck(str(folder), engine, False, at, _pieces_hf(tok, trained[at:at + 4]),
                                 _pieces_hf(served_tok, served[at:at + 4]), eot, stops, missing)
    return TemplateCheck(str(folder), engine, True, None, [], [], eot, stops, missing)


def check_export(source: str | Path, output: str | Path, fmt: str, strict: bool = False,
                 tok: Any = None, label: str | None = None) -> TemplateCheck:
    """Check an export against the source's training template; `strict` turns a problem into an error,
    otherwise each problem (and each note about other engines) is printed as a warning. `label` names the
    output in messages (default: its path)."""
    import sys

    tok = tok if tok is not None else training_tokenizer(source)
    result = check_gguf(tok, output) if fmt == "gguf" else check_folder(tok, output)
    result.served = label or str(output)
    for problem in result.problems:
        if strict:
            raise TunekitError(f"{problem} (--strict)")
        print(f"warning: {problem}", file=sys.stderr)
    for note in result.notes:
        print(f"warning: {note}", file=sys.stderr)
    return result
