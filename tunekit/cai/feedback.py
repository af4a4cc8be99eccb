"""Phase 2 of Constitutional AI (RL-CAI; Bai et al., 2022, §4): AI feedback as multiple-choice log-probs.

For a prompt x and two responses (y₁, y₂), the feedback model reads a principle's comparison question with the
pair as options (A) and (B), and the next tokens after "The answer is (" are scored — no text is generated or
parsed (the multiple-choice scoring of tunekit/evaluation/choice.py, shared with `tunekit eval --judge`). With
ℓ_A, ℓ_B the log-probabilities of the choice tokens, the normalised probability of (A) is
    P(A) = exp ℓ_A / (exp ℓ_A + exp ℓ_B).
Each of k sampled principles is asked in both orders, so position bias cancels:
    p(y₁ ≻ y₂) = (1 / 2k) Σ_principles [ P(A | y₁ as A, y₂ as B) + P(B | y₂ as A, y₁ as B) ],
which makes p(y₂ ≻ y₁) = 1 − p(y₁ ≻ y₂) exactly. The preferred response is `chosen`; the confidence is
|2p − 1| (0 = a coin flip, 1 = certain), and pairs under `min_confidence` are dropped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunekit.cai.constitution import Constitution, Principle
from tunekit.cai.prompts import Messages
from tunekit.evaluation.choice import both_orders

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
    drawn = [draw_principles(constitution, pair_id, k, seed) for pair_id, _, _, _ in items]
    asked = [(prompt, first, second, [pr.comparison for pr in principles])
             for (_, prompt, first, second), principles in zip(items, drawn)]
    out: list[Judgement] = []
    for principles, probs in zip(drawn, both_orders(model, tok, asked, batch_size)):
        scores = [{"principle": pr.id, "as_a": as_a, "as_b": as_b} for pr, (as_a, as_b) in zip(principles, probs)]
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
