"""An Ollama `Modelfile` beside an exported GGUF, so `ollama create NAME -f FILE` serves the tuned model with
the template and stop tokens it was trained with.

The Jinja chat template is translated into Ollama's Go template only for the families we know (ChatML, as
used by SmolLM2 and Qwen; Llama 3). A family is recognised by rendering several conversations with the
tokenizer's own Jinja template and with a Python mirror of the family's Go template: they must be equal, text
for text. A template no family reproduces is said so in the file and the report, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]

PROBES: list[Messages] = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}],
    [{"role": "system", "content": "S."}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}],
]

# Ollama passes the conversation as .Messages (with the Modelfile's SYSTEM as a first system message when the
# request has none); `$last` marks the final message, after which the assistant's header opens its answer.
CHATML_GO = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
    "{{ end }}\n"
    "{{- end }}"
)
CHATML_DEFAULT_SYSTEM_GO = (
    "{{- if or (not .Messages) (ne (index .Messages 0).Role \"system\") }}<|im_start|>system\n"
    "{DEFAULT}<|im_end|>\n"
    "{{ end }}"
)
LLAMA3_GO = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{{ end }}\n"
    "{{- end }}"
)


@dataclass
class Family:
    """A template family: its Go template and a Python mirror rendering what that Go template renders."""

    name: str
    go: str
    mirror: Callable[[Messages], str]
    stops: list[str]


def _chatml_mirror(default_system: str | None) -> Callable[[Messages], str]:
    def render(messages: Messages) -> str:
        out = ""
        if default_system is not None and (not messages or messages[0]["role"] != "system"):
            out += f"<|im_start|>system\n{default_system}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if messages and messages[-1]["role"] != "assistant":
            out += "<|im_start|>assistant\n"
        return out

    return render


def _llama3_mirror(messages: Messages) -> str:
    out = ""
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    if messages and messages[-1]["role"] != "assistant":
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out


def _chatml_default_system(tok: Any) -> str | None:
    """The system message a ChatML template inserts when a conversation has none (SmolLM2 does), else None."""
    text = tok.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head): text.index("<|im_end|>")]
    return None


def candidate_families(tok: Any) -> list[Family]:
    template = getattr(tok, "chat_template", None) or ""
    found = []
    if "<|im_start|>" in template:
        default = _chatml_default_system(tok)
        go = CHATML_GO if default is None else CHATML_DEFAULT_SYSTEM_GO.replace("{DEFAULT}", default) + CHATML_GO
        found.append(Family("chatml", go, _chatml_mirror(default), ["<|im_end|>"]))
    if "<|start_header_id|>" in template:
        found.append(Family("llama3", LLAMA3_GO, _llama3_mirror, ["<|eot_id|>"]))
    return found


def jinja_render(tok: Any, messages: Messages) -> str:
    """The tokenizer's own rendering as Ollama would feed it: generation prompt after a user turn, without the
    leading BOS text (llama.cpp adds BOS itself)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant")
    bos = getattr(tok, "bos_token", None)
    emits_bos = "bos_token" in (getattr(tok, "chat_template", None) or "")  # SmolLM2's BOS is <|im_start|>
    return text[len(bos):] if emits_bos and bos and text.startswith(bos) else text


def translate(tok: Any) -> Family | None:
    """The family whose Go template renders every probe conversation as the tokenizer's Jinja template does."""
    for family in candidate_families(tok):
        try:
            if all(family.mirror(m) == jinja_render(tok, m) for m in PROBES):
                return family
        except Exception:  # a template that refuses a probe (e.g. no system role) is not this family
            continue
    return None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError("text holds triple quotes")
    return f'"""{text}"""'


def modelfile_path(gguf: str | Path) -> Path:
    gguf = Path(gguf)
    return gguf.with_name(gguf.stem + ".Modelfile")


def build_modelfile(gguf_name: str, tok: Any, system: str | None = None) -> tuple[str, dict[str, Any]]:
    """(Modelfile text, report): FROM, TEMPLATE when translatable, PARAMETER stop per end-of-turn token,
    SYSTEM when given."""
    from tunekit.chat.serving import end_of_turn_tokens

    family = translate(tok)
    stops = list(dict.fromkeys([*(family.stops if family else []), *end_of_turn_tokens(tok)]))
    lines = ["# Ollama Modelfile written by tunekit quantize: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}"]
    report: dict[str, Any] = {"family": family.name if family else None, "stops": stops}
    if family is not None:
        lines.append(f"TEMPLATE {_quoted(family.go)}")
    else:
        report["note"] = ("chat template not translated: it matches none of the families tunekit translates "
                          "(chatml, llama3); Ollama will use its own guess, check `ollama show NAME --template`")
        lines.append(f"# TEMPLATE not written: {report['note']}")
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n", report


def write_modelfile(gguf: str | Path, tok: Any, system: str | None = None, path: str | Path | None = None
                    ) -> dict[str, Any]:
    """Write the Modelfile for `gguf` (default `<stem>.Modelfile` beside it); returns the report."""
    gguf = Path(gguf)
    target = Path(path) if path is not None else modelfile_path(gguf)
    text, report = build_modelfile(gguf.name, tok, system)
    target.write_text(text, encoding="utf-8")
    report["path"] = str(target)
    return report
