"""Regenerate tunekit/assets/demo/{train,eval}.jsonl (deterministic). The demo task: terse answers.

The instruct model answers in full sentences ("The capital of France is Paris."); the dataset teaches a
one-word/number answer style across three task families, so held-out perplexity and exact match both move.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Greece": "Athens", "Turkey": "Ankara", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem",
    "Australia": "Canberra", "New Zealand": "Wellington", "Nigeria": "Abuja", "Ukraine": "Kyiv",
    "Czech Republic": "Prague", "Romania": "Bucharest", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Philippines": "Manila", "Indonesia": "Jakarta", "Pakistan": "Islamabad", "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa", "Iceland": "Reykjavik", "Scotland": "Edinburgh", "England": "London",
    "Wales": "Cardiff", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Ghana": "Accra",
}
WORDS = ["apple", "river", "green", "silent", "planet", "music", "window", "garden", "yellow", "bridge",
         "coffee", "winter", "rocket", "forest", "candle", "mirror", "dragon", "pencil", "summer", "castle",
         "ocean", "tiger", "violin", "cloud", "marble", "orange", "silver", "thunder", "meadow", "lantern"]


def records(rng: random.Random):
    for country, capital in CAPITALS.items():
        yield {"instruction": f"What is the capital of {country}? Answer with the city name only.",
               "output": capital}
    for _ in range(90):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        yield {"instruction": f"What is {a} plus {b}? Answer with the number only.", "output": str(a + b)}
    for _ in range(60):
        w = " ".join(rng.sample(WORDS, 2))
        yield {"instruction": f"Write in capital letters: {w}", "output": w.upper()}


def main() -> None:
    rng = random.Random(0)
    rows = list(records(rng))
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "tunekit" / "assets" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    n_eval = 32
    for name, part in (("eval.jsonl", rows[:n_eval]), ("train.jsonl", rows[n_eval:])):
        with (out / name).open("w") as fh:
            for r in part:
                fh.write(json.dumps(r) + "\n")
        print(name, len(part))


if __name__ == "__main__":
    main()
