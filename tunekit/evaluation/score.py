"""Score a chat model on conversations.

perplexity = exp( Σ_assistant-tokens −log p(token) / N_assistant-tokens ), with the same assistant mask as
training; exact_match = share of conversations whose greedy answer to the prompt (all turns before the
last assistant turn) equals the reference last assistant message after stripping whitespace.
"""

from __future__ import annotations

import math
from typing import Any

from tunekit.data.templates import render, tokenize_conversation

Messages = list[dict[str, str]]


def split_prompt(messages: Messages) -> tuple[Messages, str] | None:
    """(prompt turns, reference answer) for a conversation ending in an assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]


def perplexity(model: Any, tok: Any, conversations: list[Messages], max_length: int = 1024, batch_size: int = 8):
    """(mean NLL per assistant token, token count) over `conversations`."""
    import torch

    from tunekit.data.collate import SFTCollator

    rows = [tokenize_conversation(tok, m, max_length) for m in conversations]
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows if not r.dropped]
    collate = SFTCollator(tok.pad_token_id)
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((shift_labels != -100).sum())
    return (total_nll / total_tokens if total_tokens else float("nan")), total_tokens


def generate(model: Any, tok: Any, prompts: list[Messages], max_new_tokens: int = 64, batch_size: int = 8):
    """Greedy answers to chat prompts (left-padded batches); stops at the tokenizer/model EOS."""
    import torch

    device = next(model.parameters()).device
    texts = [render(tok, p, generation_prompt=True) for p in prompts]
    outputs: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                )
            for row in out[:, enc["input_ids"].shape[1] :]:
                outputs.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = side
    return outputs


def evaluate(
    model: Any,
    tok: Any,
    conversations: list[Messages],
    max_length: int = 1024,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generate_answers: bool = True,
) -> dict[str, Any]:
    """{'loss', 'perplexity', 'tokens', 'exact_match', 'n', 'answers'}."""
    nll, tokens = perplexity(model, tok, conversations, max_length, batch_size)
    result: dict[str, Any] = {
        "n": len(conversations),
        "loss": nll,
        "perplexity": math.exp(nll) if tokens else float("nan"),
        "tokens": tokens,
    }
    if generate_answers:
        pairs = [p for p in (split_prompt(m) for m in conversations) if p is not None]
        answers = generate(model, tok, [p for p, _ in pairs], max_new_tokens, batch_size)
        hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs)]
        result["exact_match"] = sum(hits) / len(hits) if hits else None
        result["answers"] = [
            {"prompt": p[-1]["content"], "reference": ref, "answer": a, "match": h}
            for (p, ref), a, h in zip(pairs, answers, hits)
        ]
    return result
