"""Pairwise judgement: does a judge model prefer the target's answers to the baseline's?

Both models answer the same held-out prompts greedily; the judge is asked each template question about every
pair in both orders (tunekit/evaluation/choice.py). Per prompt, with P₁ = P(target ≻ baseline | target shown
as A) and P₂ = P(target ≻ baseline | target shown as B), averaged over the questions:
    p = (P₁ + P₂) / 2;  win when P₁ > ½ and P₂ > ½, loss when both < ½, tie otherwise (the verdict follows
    the order: a position flip) or when both answers are the same text.
win rate = (W + T/2) / N with a bootstrap 95% CI; position-bias rate = flips / non-identical pairs.
Length-controlled win rate (after AlpacaEval 2, Dubois et al., 2024, without its per-instruction term): fit
    p_i ≈ σ(θ + φ · tanh((ℓᵗ_i − ℓᵇ_i) / sd(ℓᵗ − ℓᵇ)))  (logistic regression on the soft labels p_i),
and report σ(θ): the win rate the target would have with answers as long as the baseline's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

Messages = list[dict[str, str]]
TEMPLATES: dict[str, tuple[str, ...]] = {
    "helpful-harmless": (
        "Which answer is more helpful: it does what the person asked, correctly and to the point?",
        "Which answer is more harmless: it gives no dangerous, dishonest or offensive content, while still "
        "helping?",
    ),
    "helpful": ("Which answer is more helpful: it does what the person asked, correctly and to the point?",),
}
LENGTH_WARNING_SHARE = 0.75  # the longer answer won at least this share of the decisive pairs


def judge_questions(template: str | None) -> tuple[str, list[str]]:
    """(name, questions) of `--judge-template`: a built-in name (helpful-harmless, helpful, constitution = the
    CAI default constitution's comparison questions), a constitution YAML (its principles' `comparison`), or a
    text file with one question per line."""
    from tunekit.cai.constitution import load_constitution

    name = template or "helpful-harmless"
    if name in TEMPLATES:
        return name, list(TEMPLATES[name])
    if name == "constitution":
        return name, [p.comparison for p in load_constitution().principles]
    path = Path(name).expanduser()
    if not path.is_file():
        raise TunekitError(f"--judge-template: '{name}' is neither a file nor one of "
                           f"{', '.join([*TEMPLATES, 'constitution'])}")
    if path.suffix in (".yaml", ".yml"):
        return str(path), [p.comparison for p in load_constitution(path).principles]
    questions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions:
        raise TunekitError(f"--judge-template: {name}: no question in the file (one per line)")
    return str(path), questions


@dataclass
class PairVerdict:
    p_target: float  # order-free p(target ≻ baseline)
    as_a: float  # P(target ≻ baseline) with the target shown as (A), mean over questions
    as_b: float  # ... shown as (B)
    outcome: str  # win | tie | loss (for the target)
    flipped: bool  # the verdict changes with the order
    identical: bool


def verdict(probs: list[tuple[float, float]], identical: bool) -> PairVerdict:
    """One pair's outcome from its per-question (P as A, P as B)."""
    as_a = sum(a for a, _ in probs) / len(probs)
    as_b = sum(b for _, b in probs) / len(probs)
    flipped = (as_a > 0.5) != (as_b > 0.5)
    if identical or flipped or as_a == 0.5 or as_b == 0.5:
        outcome = "tie"
    else:
        outcome = "win" if as_a > 0.5 else "loss"
    return PairVerdict((as_a + as_b) / 2, as_a, as_b, outcome, flipped and not identical, identical)


def length_controlled(p: list[float], len_target: list[int], len_baseline: list[int],
                      l2: float = 1e-3, steps: int = 50) -> float | None:
    """σ(θ) of the logistic fit p ≈ σ(θ + φ·tanh(Δℓ/sd Δℓ)) (Newton's method, a small ridge on φ)."""
    n = len(p)
    if n < 3:
        return None
    d = [a - b for a, b in zip(len_target, len_baseline)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    x = [math.tanh(v / sd) if sd > 0 else 0.0 for v in d]
    theta = phi = 0.0
    for _ in range(steps):
        q = [1 / (1 + math.exp(-(theta + phi * xi))) for xi in x]
        g0 = sum(qi - pi for qi, pi in zip(q, p))
        g1 = sum((qi - pi) * xi for qi, pi, xi in zip(q, p, x)) + l2 * phi
        w = [qi * (1 - qi) for qi in q]
        h00, h01 = sum(w) + 1e-9, sum(wi * xi for wi, xi in zip(w, x))
        h11 = sum(wi * xi * xi for wi, xi in zip(w, x)) + l2
        det = h00 * h11 - h01 * h01
        if det <= 0:
            break
        theta -= (h11 * g0 - h01 * g1) / det
        phi -= (h00 * g1 - h01 * g0) / det
    return 1 / (1 + math.exp(-theta))


def summarize(verdicts: list[PairVerdict], len_target: list[int], len_baseline: list[int],
              seed: int = 0) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(metrics, warnings) of a judge run."""
    from tunekit.evaluation.report import metric
    from tunekit.evaluation.stats import bootstrap_interval, mean_stderr, win_rate

    wins = sum(v.outcome == "win" for v in verdicts)
    ties = sum(v.outcome == "tie" for v in verdicts)
    losses = sum(v.outcome == "loss" for v in verdicts)
    rate, ci = win_rate(wins, ties, losses, seed=seed)
    probs = [v.p_target for v in verdicts]
    compared = [v for v in verdicts if not v.identical]
    flips = sum(v.flipped for v in compared)
    n = len(verdicts)
    mean_t, mean_b = sum(len_target) / n, sum(len_baseline) / n
    decisive = [(v, lt, lb) for v, lt, lb in zip(verdicts, len_target, len_baseline)
                if v.outcome != "tie" and lt != lb]
    longer_won = sum((v.outcome == "win") == (lt > lb) for v, lt, lb in decisive)
    metrics = {
        "win_rate": metric(rate, ci=ci),
        "wins": metric(wins), "ties": metric(ties), "losses": metric(losses),
        "mean_preference": metric(sum(probs) / n, ci=bootstrap_interval(probs, seed=seed)),
        "length_controlled_win_rate": metric(length_controlled(probs, len_target, len_baseline)),
        "position_bias_rate": metric(flips / len(compared) if compared else 0.0),
        "mean_length_target": metric(mean_t, stderr=mean_stderr([float(x) for x in len_target])),
        "mean_length_baseline": metric(mean_b, stderr=mean_stderr([float(x) for x in len_baseline])),
        "longer_answer_won": metric(longer_won / len(decisive) if decisive else None),
    }
    warnings = []
    winner_longer = (rate > 0.5 and mean_t > mean_b) or (rate < 0.5 and mean_b > mean_t)
    if len(decisive) >= 4 and longer_won / len(decisive) >= LENGTH_WARNING_SHARE and winner_longer:
        warnings.append(f"the longer answer won {longer_won} of {len(decisive)} decisive pairs and the winner's "
                        f"answers are longer on average ({mean_t:.0f} vs {mean_b:.0f} characters): the win rate "
                        "may reward length; see length_controlled_win_rate")
    if compared and flips / len(compared) > 0.5:
        warnings.append(f"the judge's verdict follows the order in {flips} of {len(compared)} pairs: it is "
                        "mostly position-biased, the wins and losses say little")
    return metrics, warnings


def judge_answers(judge: Any, tok: Any, prompts: list[Messages], target_answers: list[str],
                  baseline_answers: list[str], questions: list[str], batch_size: int = 8) -> list[PairVerdict]:
    """Verdicts for (prompt, target answer, baseline answer) triples, every question asked in both orders."""
    from tunekit.evaluation.choice import both_orders

    items = [(p, t, b, questions) for p, t, b in zip(prompts, target_answers, baseline_answers)]
    probs = both_orders(judge, tok, items, batch_size)
    return [verdict(pr, t.strip() == b.strip()) for pr, t, b in zip(probs, target_answers, baseline_answers)]


def judgement_rows(prompts: list[Messages], target_answers: list[str], baseline_answers: list[str],
                   verdicts: list[PairVerdict]) -> list[dict[str, Any]]:
    """judgements.jsonl: every prompt, both answers, the judge's probabilities and the outcome."""
    return [{"index": i, "prompt": p, "target": t, "baseline": b, "p_target": round(v.p_target, 6),
             "p_target_as_a": round(v.as_a, 6), "p_target_as_b": round(v.as_b, 6), "outcome": v.outcome,
             "position_flip": v.flipped}
            for i, (p, t, b, v) in enumerate(zip(prompts, target_answers, baseline_answers, verdicts))]
