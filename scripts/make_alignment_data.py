"""Regenerate tunekit/assets/align/ (deterministic): data for rm, dpo and grpo on the embedded model.

- math_{train,eval}.jsonl (prompt-only, for grpo/ppo): one-step arithmetic word problems; `answer` holds the
  GSM8K-style solution ending in `#### N`, which the `math_answer` reward compares with.
- pref_{train,eval}.jsonl (preference, for rm/dpo/ppo): the correct answer is chosen. The rejected one is mostly a
  hard negative in the chosen answer's own form, so that a reward model must judge correctness, not topic or
  form: a number off by a little, a number copied from the question, the same constant for every sum, another
  capital, the country's own name, or a hedge (several answers listed, the right one among them). One pair in
  eight rejects a refusal or a dodge. Chosen and rejected are both sentences ("The answer is 12.") or both bare
  ("12" or "12.", the full stop drawn apart for each). Why (docs/benchmarks.md, issue #9): a reward model trained
  against refusals learned "on topic", and PPO answered capitals with the country; one without hedges was hacked
  by listing numbers ("38\n36\n34"); one whose hedges alone lacked a full stop scored every bare answer ~-7.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tunekit" / "assets" / "align"
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Milo",
         "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "shells", "coins", "cards", "stamps"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Greece": "Athens", "Norway": "Oslo",
            "Peru": "Lima", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Cuba": "Havana",
            "Chile": "Santiago", "Sweden": "Stockholm", "Portugal": "Lisbon", "Hungary": "Budapest",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Finland": "Helsinki", "Denmark": "Copenhagen",
            "Belgium": "Brussels", "Turkey": "Ankara", "Ghana": "Accra", "Iceland": "Reykjavik"}
UNHELPFUL = ["I don't know.", "Figure it out yourself.", "That is not something I can help with.",
             "Why do you want to know?", "Ask someone else.", "No comment."]


def word_problem(rng: random.Random) -> tuple[str, int, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    kind = rng.choice(["more", "gives", "twice"])
    if kind == "more":
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        n, steps = a + b, f"{a} + {b} = {a + b}"
    elif kind == "gives":
        a = a + b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        n, steps = a - b, f"{a} - {b} = {a - b}"
    else:
        a = rng.randint(2, 12)
        q = f"{name} has {a} {item}. A friend has twice as many. How many {item} does the friend have?"
        n, steps = 2 * a, f"2 * {a} = {2 * a}"
    return q, n, f"{steps}\n#### {n}"


def math_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        q, _, solution = word_problem(rng)
        out.append({"prompt": q + " Give the final answer as a number.", "answer": solution})
    return out


def _rejected_kind(rng: random.Random) -> str:
    return rng.choices(["near", "echo", "constant", "hedge", "refusal"], weights=[2, 2, 1, 2, 1])[0]


def _hedge(rng: random.Random, right: str, others: list[str]) -> str:
    """Several answers at once, the right one among them: a policy must not earn reward by listing guesses."""
    picks = rng.sample(others, k=min(len(others), rng.randint(1, 3))) + [right]
    rng.shuffle(picks)
    return rng.choice(["\n", ", ", " or "]).join(picks) + _stop(rng)


def _stop(rng: random.Random) -> str:
    """A bare answer ends in a full stop or not, at random and apart for chosen and rejected: a reward model
    that keyed on the full stop (the first hedges had none) scored every bare answer of the sft model ~-7."""
    return rng.choice(["", "."])


def math_pair(rng: random.Random) -> tuple[str, str, str]:
    q, ans, _ = word_problem(rng)
    kind = _rejected_kind(rng)
    operands = [int(t) for t in q.replace("?", " ").replace(".", " ").split() if t.isdigit() and int(t) != ans]
    if kind == "echo" and operands:
        wrong = rng.choice(operands)
    elif kind == "constant" and ans != 4:
        wrong = 4
    else:
        wrong = ans + rng.choice([-3, -2, -1, 1, 2, 3])
    if kind == "refusal":
        return q, f"The answer is {ans}.", rng.choice(UNHELPFUL)
    if kind == "hedge":
        near = [str(ans + d) for d in (-3, -2, -1, 1, 2, 3, 10) if ans + d >= 0] + [str(x) for x in operands]
        return q, f"{ans}{_stop(rng)}", _hedge(rng, str(ans), sorted(set(near) - {str(ans)}))
    if rng.random() < 0.5:
        return q, f"{ans}{_stop(rng)}", f"{wrong}{_stop(rng)}"
    return q, f"The answer is {ans}.", f"The answer is {wrong}."


def capital_pair(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(list(CAPITALS))
    q = f"What is the capital of {country}?"
    right = CAPITALS[country]
    kind = _rejected_kind(rng)
    if kind == "refusal":
        return q, f"The capital of {country} is {right}.", rng.choice(UNHELPFUL)
    if kind == "hedge":
        return q, f"{right}{_stop(rng)}", _hedge(rng, right, [country] + [c for c in CAPITALS.values() if c != right])
    wrong = country if kind in ("echo", "constant") else rng.choice([c for k, c in CAPITALS.items() if k != country])
    if rng.random() < 0.5:
        return q, f"{right}{_stop(rng)}", f"{wrong}{_stop(rng)}"
    return q, f"The capital of {country} is {right}.", f"The capital of {country} is {wrong}."


def preference_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        q, chosen, rejected = (math_pair if i % 2 == 0 else capital_pair)(rng)
        out.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    return out


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    write("math_train.jsonl", math_records(rng, 400))
    write("math_eval.jsonl", math_records(rng, 64))
    write("pref_train.jsonl", preference_records(rng, 400))
    write("pref_eval.jsonl", preference_records(rng, 64))


if __name__ == "__main__":
    main()
