"""Phase 2 of Constitutional AI (RL-CAI; Bai et al., 2022, §4): AI feedback as multiple-choice log-probs.

For a prompt x and two responses (y₁, y₂), the feedback model reads a principle's comparison question with the
pair as options (A) and (B), and the next tokens after "The answer is (" are scored — no text is generated or
parsed. With ℓ_A, ℓ_B the log-probabilities of the choice tokens, the normalised probability of (A) is
    P(A) = exp ℓ_A / (exp ℓ_A + exp ℓ_B).
Each of k sampled principles is asked in both orders, so position bias cancels:
    p(y₁ ≻ y₂) = (1 / 2k) Σ_principles [ P(A | y₁ as A, y₂ as B) + P(B | y₂ as A, y₁ as B) ],
which makes p(y₂ ≻ y₁) = 1 − p(y₁ ≻ y₂) exactly. The preferred response is `chosen`; the confidence is
|2p − 1| (0 = a coin flip, 1 = certain), and pairs under `min_confidence` are dropped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunekit.cai.constitution import Constitution, Principle
from tunekit.cai.prompts import Messages
from tunekit.data.templates import render

LABELS = ("A", "B")
ANSWER_PREFIX = "The answer is ("
PREFERENCE_FIELDS = (
    "id",  # prompt id
    "prompt",  # the prompt as given (string or message list)
    "chosen",  # the preferred response
    "rejected",  # the other one
    "p_chosen",  # p(chosen ≻ rejected), averaged over principles and both orders (≥ 0.5)
    "confidence",  # |2·p_chosen − 1|
    "principles",  # the principle ids asked
    "scores",  # per principle: P(chosen ≻ rejected) with chosen shown as (A) and as (B)
)


def transcript(prompt: Messages) -> str:
    names = {"user": "Person", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def judgement_context(tok: Any, prompt: Messages, principle: Principle, option_a: str, option_b: str) -> str:
    """The multiple-choice question, rendered with the chat template and ending right before the choice token."""
    body = (
        "Consider the following conversation between a person and an assistant:\n\n"
        f"{transcript(prompt)}\n\n{principle.comparison}\n\n"
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


def draw_principles(constitution: Constitution, pair_id: str, k: int, seed: int) -> list[Principle]:
    """k distinct principles for one pair, seeded by the pair id only (not by the order of the responses)."""
    rng = random.Random(f"{seed}:{pair_id}:judge")
    return rng.sample(list(constitution.principles), min(k, len(constitution.principles)))


@dataclass
class Judgement:
    p_first: float  # p(first ≻ second), averaged over principles and both orders
    principles: list[str]
    scores: list[dict[str, float]]  # per principle: {"as_a": P(A | first as A), "as_b": P(B | first as B)}

    @property
    def confidence(self) -> float:
        return abs(2.0 * self.p_first - 1.0)


def judge_pairs(
    model: Any,
    tok: Any,
    constitution: Constitution,
    items: Sequence[tuple[str, Messages, str, str]],
    k: int,
    seed: int = 0,
    batch_size: int = 8,
) -> list[Judgement]:
    """Judge (pair_id, prompt, first, second) items: k principles × both orders each."""
    contexts: list[str] = []
    drawn: list[list[Principle]] = []
    for pair_id, prompt, first, second in items:
        principles = draw_principles(constitution, pair_id, k, seed)
        drawn.append(principles)
        for pr in principles:
            contexts.append(judgement_context(tok, prompt, pr, first, second))  # first as (A)
            contexts.append(judgement_context(tok, prompt, pr, second, first))  # first as (B)
    lps = iter(choice_logprobs(model, tok, contexts, batch_size))
    out: list[Judgement] = []
    for principles in drawn:
        scores = []
        for pr in principles:
            a_order, b_order = next(lps), next(lps)
            scores.append({"principle": pr.id, "as_a": prob_first(*a_order), "as_b": 1.0 - prob_first(*b_order)})
        p = sum(s["as_a"] + s["as_b"] for s in scores) / (2 * len(scores))
        out.append(Judgement(p, [pr.id for pr in principles], scores))
    return out


def preference_record(pair_id: str, prompt: Any, first: str, second: str, j: Judgement) -> dict[str, Any]:
    """One `preference`-format record (prompt/chosen/rejected) with the AI-feedback soft label."""
    first_wins = j.p_first >= 0.5
    # scores are re-expressed for the chosen response: P(chosen ≻ rejected) with chosen shown as (A) / as (B)
    scores = [
        {"principle": s["principle"], "as_a": s["as_a"], "as_b": s["as_b"]}
        if first_wins
        else {"principle": s["principle"], "as_a": 1.0 - s["as_b"], "as_b": 1.0 - s["as_a"]}
        for s in j.scores
    ]
    return {
        "id": pair_id,
        "prompt": prompt,
        "chosen": first if first_wins else second,
        "rejected": second if first_wins else first,
        "p_chosen": round(max(j.p_first, 1.0 - j.p_first), 6),
        "confidence": round(j.confidence, 6),
        "principles": j.principles,
        "scores": [{"principle": s["principle"], "as_a": round(s["as_a"], 6), "as_b": round(s["as_b"], 6)}
                   for s in scores],
    }
