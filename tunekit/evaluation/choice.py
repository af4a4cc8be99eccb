"""Multiple-choice judgement from log-probabilities: which of two answers does a judge model prefer?

The judge reads a comparison question with the two answers as options (A) and (B); the next token after
"The answer is (" is scored, nothing is generated or parsed. With ℓ_A, ℓ_B the log-probabilities of the
choice tokens, P(A) = exp ℓ_A / (exp ℓ_A + exp ℓ_B). Asked in both orders, position bias cancels:
    p(y₁ ≻ y₂) = ½ [ P(A | y₁ as A, y₂ as B) + P(B | y₂ as A, y₁ as B) ],
so p(y₂ ≻ y₁) = 1 − p(y₁ ≻ y₂) exactly. Used by CAI's AI feedback (Bai et al., 2022, §4) and by
`tunekit eval --judge` (pairwise win rate, as in AlpacaEval; Li et al., 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tunekit.data.templates import render

Messages = list[dict[str, str]]
LABELS = ("A", "B")
ANSWER_PREFIX = "The answer is ("


def transcript(prompt: Messages) -> str:
    names = {"user": "Person", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def judgement_context(tok: Any, prompt: Messages, question: str, option_a: str, option_b: str) -> str:
    """The multiple-choice question, rendered with the chat template and ending right before the choice token."""
    body = (
        "Consider the following conversation between a person and an assistant:\n\n"
        f"{transcript(prompt)}\n\n{question}\n\n"
        f"({LABELS[0]}) {option_a}\n\n({LABELS[1]}) {option_b}\n\n"
        f"Answer with {LABELS[0]} or {LABELS[1]}."
    )
    return render(tok, [{"role": "user", "content": body}], generation_prompt=True) + ANSWER_PREFIX


def choice_logprobs(model: Any, tok: Any, contexts: Sequence[str], batch_size: int = 8) -> list[tuple[float, float]]:
    """(log p(A | context), log p(B | context)) for each context, from one forward pass per row.

    Contexts and labels are tokenised separately and concatenated, so a label is always the same token ids.
    Rows are right-padded: every real token keeps its unpadded position, so the result equals an unbatched pass.
    """
    import torch

    label_ids = [tok(label, add_special_tokens=False)["input_ids"] for label in LABELS]
    single = all(len(ids) == 1 for ids in label_ids)
    rows: list[list[int]] = []
    spans: list[tuple[int, int]] = []  # (start, end) of the scored label tokens in each row
    for ctx in contexts:
        ids = tok(ctx, add_special_tokens=False)["input_ids"]
        if single:
            rows.append(ids)
            spans.append((len(ids), len(ids) + 1))
        else:
            for lab in label_ids:
                rows.append(ids + lab)
                spans.append((len(ids), len(ids) + len(lab)))
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out_rows: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            with torch.no_grad():
                logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            for j, r in enumerate(chunk):
                start, end = spans[i + j]
                if single:
                    out_rows.append([float(logp[j, start - 1, lab[0]]) for lab in label_ids])
                else:
                    lab = r[start:end]
                    out_rows.append([sum(float(logp[j, start - 1 + t, tid]) for t, tid in enumerate(lab))])
    finally:
        model.train(was_training)
    if single:
        return [(a, b) for a, b in out_rows]
    flat = [v[0] for v in out_rows]
    return [(flat[2 * k], flat[2 * k + 1]) for k in range(len(contexts))]


def prob_first(logprob_a: float, logprob_b: float) -> float:
    """Normalised P(A) = exp ℓ_A / (exp ℓ_A + exp ℓ_B), computed stably."""
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def both_orders(model: Any, tok: Any, items: Sequence[tuple[Messages, str, str, Sequence[str]]],
                batch_size: int = 8) -> list[list[tuple[float, float]]]:
    """For each (prompt, first, second, questions): per question (P(first ≻ second | first shown as A),
    P(first ≻ second | first shown as B)); their mean is the order-free p(first ≻ second)."""
    contexts: list[str] = []
    for prompt, first, second, questions in items:
        for q in questions:
            contexts.append(judgement_context(tok, prompt, q, first, second))  # first as (A)
            contexts.append(judgement_context(tok, prompt, q, second, first))  # first as (B)
    lps = iter(choice_logprobs(model, tok, contexts, batch_size))
    out: list[list[tuple[float, float]]] = []
    for _, _, _, questions in items:
        row = []
        for _ in questions:
            a_order, b_order = next(lps), next(lps)
            row.append((prob_first(*a_order), 1.0 - prob_first(*b_order)))
        out.append(row)
    return out
