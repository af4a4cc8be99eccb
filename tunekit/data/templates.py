"""Chat templates and the assistant-token mask.

TRL's `assistant_only_loss` needs `{% generation %}` markers that real templates (SmolLM2's included) lack.
We instead render the conversation prefix by prefix: the characters that rendering `messages[:i+1]` adds
over `messages[:i]` + generation prompt are assistant turn i, up to and including its end-of-turn token.
Character spans map to tokens through the fast tokenizer's offsets. This works on any template whose
renderings of prefixes are prefixes of the whole rendering (ChatML, Llama 3, Mistral, Gemma, SmolLM2...);
for others we fall back to locating each assistant message's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunekit.errors import TunekitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


def apply_template_choice(tok: PreTrainedTokenizerBase, choice: str | None) -> list[str]:
    """Set the tokenizer's chat template from the recipe; returns special tokens added to the vocabulary.

    None keeps the tokenizer's own template, or falls back to `chatml` when it has none (base models).
    A ChatML template on a vocabulary without `<|im_start|>`/`<|im_end|>` adds them as special tokens and
    makes `<|im_end|>` the EOS, so the tuned model stops at the end of its turn.
    """
    if choice is None:
        if tok.chat_template:
            return []
        template = CHATML
    elif choice in NAMED_TEMPLATES:
        template = NAMED_TEMPLATES[choice]
    elif choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise TunekitError(f"model.chat_template: file '{choice}' not found")
        template = path.read_text(encoding="utf-8")
    elif "{%" in choice or "{{" in choice:
        template = choice
    else:
        raise TunekitError(
            f"model.chat_template: unknown template '{choice}' (named: {', '.join(NAMED_TEMPLATES)}; "
            "or a .jinja file, or a Jinja string)"
        )
    tok.chat_template = template
    added: list[str] = []
    if "<|im_end|>" in template:
        vocab = tok.get_vocab()
        added = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
        if added:
            tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        tok.eos_token = "<|im_end|>"
    return added


def render(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str) -> list[tuple]:
    """[start, end) character spans of each assistant turn in `full`, end-of-turn token included."""
    eos = tok.eos_token or ""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tok, messages[:i], generation_prompt=True) if i else None
        through = render(tok, messages[: i + 1])
        if before is not None and full.startswith(before) and full.startswith(through) and len(through) > len(before):
            start, end = len(before), len(through)
        else:  # template re-renders earlier turns differently: find the content itself
            start = full.find(msg["content"], cursor)
            if start < 0:
                raise TunekitError("chat template drops assistant content; cannot build the loss mask")
            end = start + len(msg["content"])
            nxt = full.find(eos, end) if eos else -1
            if eos and nxt >= 0 and full[end:nxt].strip() == "":
                end = nxt + len(eos)
        # Stop right after the end-of-turn token: trailing newlines belong to the template, not the answer.
        segment = full[start:end]
        if eos and eos in segment:
            end = start + segment.rindex(eos) + len(eos)
        else:
            end = start + len(segment.rstrip())
        spans.append((start, end))
        cursor = end
    return spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    dropped: str | None = None  # "too_long" (truncation='drop') or "no_target" (nothing left to learn)


def tokenize_conversation(
    tok: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_length: int,
    train_on: str = "assistant",
    truncation: str = "truncate",
) -> Tokenized | None:
    """Token ids and labels (-100 outside assistant turns unless train_on='all').

    A dropped example (too long with truncation='drop', or nothing to learn left) has `dropped` set.
    """
    return tokenize_conversations(tok, [messages], max_length, train_on, truncation)[0]


def tokenize_conversations(
    tok: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_length: int,
    train_on: str = "assistant",
    truncation: str = "truncate",
) -> list[Tokenized]:
    """`tokenize_conversation` for many conversations: the chat template renders each, then one batched call of
    the (Rust) fast tokenizer encodes them all, offsets included; labels come from the assistant spans."""
    texts = [render(tok, messages) for messages in conversations]
    spans = [None if train_on == "all" else assistant_char_spans(tok, messages, full)
             for messages, full in zip(conversations, texts)]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=train_on != "all")
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        labels = list(ids) if spans[i] is None else _span_labels(ids, enc["offset_mapping"][i], spans[i])
        truncated = len(ids) > max_length
        if truncated:
            if truncation == "drop":
                out.append(Tokenized([], [], truncated, dropped="too_long"))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == -100 for label in labels[1:]):
            out.append(Tokenized([], [], truncated, dropped="no_target"))
            continue
        out.append(Tokenized(list(ids), labels, truncated))
    return out


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids where a token (non-empty, by its start character) lies in one of the sorted spans, else -100."""
    labels = [-100] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        if e > s and spans[k][0] <= s:
            labels[t] = ids[t]
    return labels
