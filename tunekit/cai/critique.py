"""Phase 1 of Constitutional AI (SL-CAI; Bai et al., 2022, §3): answer, then K rounds of critique → revision.

For each prompt x the policy answers y₀; in round k a principle c_k is drawn (seeded by prompt id and round),
the critic answers c_k's critique request about y_{k-1}, and the policy answers c_k's revision request, giving
y_k. The fine-tuning target is the last revision that is not degenerate. Every prompt's steps are one line of
`critique.jsonl` (fields in `RECORD_FIELDS`), appended as soon as its batch is done, so a killed run resumes
without redoing or duplicating a prompt (see `AppendLog`).

Degenerate revisions are filtered and counted: `empty` (no text), `truncated` (hit the length budget before
EOS), `repeated` (loops: fewer than half of its word 4-grams are distinct, or it parrots the request), `echo`
(it restates the critique or one of the requests instead of answering: word-sequence similarity ≥ 0.6, the
ratio 2M/(|a|+|b|) of difflib's matching words M).
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.cai.config import CaiConfig
from tunekit.cai.constitution import Constitution, Principle
from tunekit.cai.log import AppendLog
from tunekit.cai.prompts import Messages, Prompt

RECORD_FIELDS = (
    "id",  # prompt id (the key resuming uses)
    "prompt",  # the prompt as given (string or message list)
    "response",  # the policy's first answer y0
    "principles",  # principle id of each round
    "critiques",  # the critic's critique of each round
    "revisions",  # the policy's revision of each round
    "filters",  # per revision: null (kept) or empty / truncated / repeated / echo
    "final",  # the last kept revision (the SFT target), or null when every revision was filtered
)
FILTERS = ("empty", "truncated", "repeated", "echo")
ECHO_SIMILARITY = 0.6


@dataclass
class CritiqueStats:
    prompts: int = 0  # prompts in the set
    resumed: int = 0  # prompts already finished by an earlier (interrupted) run
    revisions: int = 0  # revisions made (prompts × rounds)
    kept: int = 0  # revisions that passed the filter
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    with_target: int = 0  # prompts with a final revision (the SFT examples)

    @property
    def kept_share(self) -> float:
        return self.kept / self.revisions if self.revisions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "filtered": dict(self.filtered), "kept_share": round(self.kept_share, 4)}


def degenerate_reason(text: str, finished: bool, request: str = "", echoes: Sequence[str] = ()) -> str | None:
    """Why a revision is unusable (`empty`, `truncated`, `repeated`, `echo`), or None when it is fine.

    `echoes` are the texts a revision must not restate (the round's critique and both requests).
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    if not finished:
        return "truncated"
    if is_repetitive(stripped) or (request and request.strip().lower() in stripped.lower()):
        return "repeated"
    if any(word_similarity(stripped, other) >= ECHO_SIMILARITY for other in (request, *echoes) if other):
        return "echo"
    return None


def word_similarity(a: str, b: str) -> float:
    """2M / (|a| + |b|) over lower-cased words, M the words difflib matches in order (1 = the same text)."""
    wa, wb = a.lower().split(), b.lower().split()
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio() if wa and wb else 0.0


def is_repetitive(text: str, n: int = 4, min_ngrams: int = 8, min_distinct_share: float = 0.5) -> bool:
    """True when fewer than half of the text's word n-grams are distinct (a generation stuck in a loop)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < min_ngrams:
        return False
    return len(set(grams)) / len(grams) < min_distinct_share


def draw_principle(constitution: Constitution, prompt_id: str, round_: int, seed: int) -> Principle:
    """The principle of one round: uniform, seeded by (seed, prompt id, round) so a resumed run draws the same."""
    return random.Random(f"{seed}:{prompt_id}:{round_}").choice(constitution.principles)


def _split_system(messages: Messages) -> tuple[Messages, Messages]:
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system, messages[len(system) :]


def few_shot_turns(principle: Principle) -> Messages:
    turns: Messages = []
    for ex in principle.examples:
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": principle.critique},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": principle.revision},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


def critique_messages(prompt: Messages, answer: str, principle: Principle, few_shot: bool = True) -> Messages:
    """[system?] + few-shot rounds + the conversation + the principle's critique request."""
    system, convo = _split_system(prompt)
    shots = few_shot_turns(principle) if few_shot else []
    return system + shots + convo + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": principle.critique},
    ]


def revision_messages(
    prompt: Messages, answer: str, critique: str, principle: Principle, few_shot: bool = True
) -> Messages:
    return critique_messages(prompt, answer, principle, few_shot) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision},
    ]


def _generate(model: Any, tok: Any, prompts: list[Messages], cfg: CaiConfig, max_new: int, seed: int):
    from tunekit.generation import sample

    ro = sample(
        model, tok, prompts, max_new_tokens=max_new, temperature=cfg.temperature, top_p=cfg.top_p,
        batch_size=cfg.generation_batch_size, seed=seed,
    )
    return ro.texts, [bool(f) for f in ro.finished.tolist()]


def run_critique(
    policy: tuple[Any, Any],
    critic: tuple[Any, Any],
    constitution: Constitution,
    prompts: Sequence[Prompt],
    cfg: CaiConfig,
    log_path: str | Path,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> CritiqueStats:
    """Run (or resume) phase 1 over `prompts`, appending to `log_path`; returns counts over the whole log."""
    model, tok = policy
    critic_model, critic_tok = critic
    log = AppendLog(log_path)
    todo = [p for p in prompts if p.id not in log]
    resumed = len(prompts) - len(todo)
    step = cfg.generation_batch_size
    for start in range(0, len(todo), step):
        batch = todo[start : start + step]
        batch_seed = random.Random(f"{seed}:{batch[0].id}").randrange(2**31)
        convos = [p.messages for p in batch]
        current, _ = _generate(model, tok, convos, cfg, cfg.max_new_tokens, batch_seed)
        records = [
            {"id": p.id, "prompt": p.prompt, "response": y0, "principles": [], "critiques": [], "revisions": [],
             "filters": [], "final": None}
            for p, y0 in zip(batch, current)
        ]
        for k in range(cfg.revision_rounds):
            principles = [draw_principle(constitution, p.id, k, seed) for p in batch]
            asks = [critique_messages(c, y, pr, cfg.few_shot) for c, y, pr in zip(convos, current, principles)]
            critiques, _ = _generate(critic_model, critic_tok, asks, cfg, cfg.critique_max_new_tokens, batch_seed + k)
            asks = [
                revision_messages(c, y, cr, pr, cfg.few_shot)
                for c, y, cr, pr in zip(convos, current, critiques, principles)
            ]
            revisions, finished = _generate(model, tok, asks, cfg, cfg.max_new_tokens, batch_seed + 1000 + k)
            for i, rec in enumerate(records):
                reason = degenerate_reason(revisions[i], finished[i], principles[i].revision,
                                           (critiques[i], principles[i].critique))
                rec["principles"].append(principles[i].id)
                rec["critiques"].append(critiques[i])
                rec["revisions"].append(revisions[i])
                rec["filters"].append(reason)
                if reason is None:
                    rec["final"] = revisions[i]
                    current[i] = revisions[i]  # the next round revises the latest usable answer
        log.append(records)
        if on_batch is not None:
            on_batch(resumed + start + len(batch), len(prompts))
    return summarize(log.in_order(p.id for p in prompts), len(prompts), resumed)


def summarize(records: list[dict[str, Any]], n_prompts: int, resumed: int = 0) -> CritiqueStats:
    stats = CritiqueStats(prompts=n_prompts, resumed=resumed)
    reasons: Counter[str] = Counter()
    for rec in records:
        for reason in rec["filters"]:
            stats.revisions += 1
            if reason is None:
                stats.kept += 1
            else:
                reasons[reason] += 1
        stats.with_target += rec["final"] is not None
    stats.filtered.update(reasons)
    return stats


def sft_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` records (prompt turns + the final revision as the assistant turn) for the phase-1 SFT."""
    out = []
    for rec in records:
        if rec["final"] is None:
            continue
        prompt = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
        out.append({"messages": [*prompt, {"role": "assistant", "content": rec["final"]}]})
    return out
