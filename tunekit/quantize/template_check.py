"""Does the served model see the prompts the tuned model was trained on, and does it stop where it learned to?

One sample conversation is rendered twice: with the training template (the run's saved tokenizer and its
`model.chat_template`) and with the template the export will be served with (a GGUF's embedded
`tokenizer.chat_template` rendered by llama.cpp's own template engine through llama-cpp-python, with the
GGUF's tokenizer and BOS rule; a folder's saved tokenizer). The two token-id sequences must be equal, and every
end-of-turn token of the training template must be a stop token of the served model (a GGUF's EOS/EOG tokens;
`generation_config.json` `eos_token_id` for folders, what transformers and vLLM stop at). A difference is
what makes a tuned model "repeat itself" or never stop once served.
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

    @property
    def problems(self) -> list[str]:
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
                "missing_stops": self.missing_stops, "ok": not self.problems}


def sample_conversation(tok: Any) -> list[dict[str, str]]:
    """SAMPLE, without its system turn when the template refuses system messages."""
    try:
        tok.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
        return SAMPLE
    except Exception:
        return SAMPLE[1:]


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
def render_gguf(llm: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
    """Render `messages` with the GGUF's embedded `tokenizer.chat_template` by llama.cpp's template engine
    (`llama_chat_apply_template`, what llama.cpp's chat tools use). A template llama.cpp does not recognise is
    an error naming it (it would be served with a guess)."""
    text, _ = _render_gguf(llm, messages, generation_prompt)
    return text


def _render_gguf(llm: Any, messages: list[dict[str, str]], generation_prompt: bool) -> tuple[str, str]:
    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise TunekitError(f"'{llm.model_path}' has no embedded chat template (tokenizer.chat_template)")
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
            raise TunekitError(f"'{llm.model_path}': llama.cpp does not recognise the embedded chat template "
                               "(servers would fall back to a guessed format)")
        if n <= size:
            return buf.raw[:n].decode("utf-8"), "llama.cpp llama_chat_apply_template"
        size = n + 1
    raise TunekitError("llama.cpp chat template rendering did not fit its buffer")


def gguf_stop_ids(llm: Any) -> list[int]:
    """The ids llama.cpp ends generation at (EOS and every end-of-generation token)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def check_gguf(tok: Any, gguf: str | Path) -> TemplateCheck:
    """Compare the training tokenizer `tok` with how `gguf` is served by llama.cpp."""
    from tunekit.quantize import llamacpp

    llm = llamacpp.load(gguf, n_ctx=64, vocab_only=True, logits_all=False)
    try:
        return _check_gguf(tok, llm, gguf)
    finally:
        llm.close()


def _check_gguf(tok: Any, llm: Any, gguf: str | Path) -> TemplateCheck:
    from tunekit.chat.serving import end_of_turn_tokens
    from tunekit.data.templates import render

    messages = sample_conversation(tok)
    trained = list(tok(render(tok, messages, generation_prompt=True), add_special_tokens=False)["input_ids"])
    try:
        text, engine = _render_gguf(llm, messages, True)
    except TunekitError as exc:
        return TemplateCheck(str(gguf), str(exc), False, 0, _pieces_hf(tok, trained[:4]), ["<unrendered>"])
    served = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    at = first_difference(trained, served)
    stops = gguf_stop_ids(llm)
    eot = end_of_turn_tokens(tok)
    missing = [t for t in eot if tok.convert_tokens_to_ids(t) not in stops]
    window = slice(at, at + 4) if at is not None else slice(0, 0)
    return TemplateCheck(
        str(gguf), engine, at is None, at, _pieces_hf(tok, trained[window]),
        [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in served[window]],
        eot, stops, missing,
    )


def _pieces_hf(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


# ------------------------------------------------------------------------------------------------ folders
def check_folder(tok: Any, folder: str | Path) -> TemplateCheck:
    """Compare the training tokenizer `tok` with the tokenizer and generation config saved in `folder`."""
    from transformers import AutoTokenizer

    from tunekit.chat.serving import end_of_turn_tokens, folder_stop_ids
    from tunekit.data.templates import render

    served_tok = AutoTokenizer.from_pretrained(str(folder))
    messages = sample_conversation(tok)
    trained = list(tok(render(tok, messages, generation_prompt=True), add_special_tokens=False)["input_ids"])
    if not served_tok.chat_template:
        return TemplateCheck(str(folder), "no chat template saved", False, 0, _pieces_hf(tok, trained[:4]), [])
    served = list(served_tok(render(served_tok, messages, generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
    at = first_difference(trained, served)
    stops = folder_stop_ids(folder)
    eot = end_of_turn_tokens(tok)
    missing = [t for t in eot if tok.convert_tokens_to_ids(t) not in stops]
    window = slice(at, at + 4) if at is not None else slice(0, 0)
    return TemplateCheck(str(folder), "transformers (saved tokenizer)", at is None, at,
                         _pieces_hf(tok, trained[window]), _pieces_hf(served_tok, served[window]), eot, stops,
                         missing)


def check_export(source: str | Path, output: str | Path, fmt: str, strict: bool = False,
                 tok: Any = None, label: str | None = None) -> TemplateCheck:
    """Check an export against the source's training template; `strict` turns a mismatch into an error,
    otherwise each problem is printed as a warning. `label` names the output in messages (default: its path)."""
    import sys

    tok = tok if tok is not None else training_tokenizer(source)
    result = check_gguf(tok, output) if fmt == "gguf" else check_folder(tok, output)
    result.served = label or str(output)
    for problem in result.problems:
        if strict:
            raise TunekitError(f"{problem} (--strict)")
        print(f"warning: {problem}", file=sys.stderr)
    return result
