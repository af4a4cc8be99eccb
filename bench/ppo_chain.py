"""sft -> rm -> ppo on the embedded SmolLM2-135M with the shipped data, each stage a real `tunekit` run.

    python bench/ppo_chain.py [--out runs/bench-ppo] [--skip-existing]

Prints (and writes OUT/summary.json) the wall time of each stage, the PPO steps, the held-out reward model
score of the policy's greedy answers before and after PPO, their exact match (the chosen answer's last word, a
number or a capital, appears as a word in the response: a reward hack shows here while the score rises), the
held-out pairwise accuracy of the reward model, the KL and the rollout/update token rates.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(stage: str, recipe: str, out: Path, *sets: str) -> float:
    if (out / "run_card.json").is_file():
        print(f"{stage}: reusing {out}")
        return json.loads((out / "run_card.json").read_text()).get("train_seconds", 0.0)
    cmd = [sys.executable, "-m", "tunekit", stage, recipe, "--output", str(out), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - started


def exact_match(rows: list[dict]) -> float | None:
    """Share of greedy answers holding the chosen answer's last word (`The answer is 12.` -> 12) as a word."""
    if not rows:
        return None
    hits = 0
    for r in rows:
        key = re.findall(r"[\w']+", r["chosen"])[-1]
        hits += bool(re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", r["response"], flags=re.IGNORECASE))
    return hits / len(rows)


def held_out_answers(ppo: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    path = ppo / "eval_answers.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def rm_accuracy(rm: Path) -> float | None:
    card = json.loads((rm / "run_card.json").read_text())
    return card.get("metrics", {}).get("eval_accuracy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-ppo")
    ap.add_argument("--ppo-steps", type=int, default=None)
    args = ap.parse_args()
    out = ROOT / args.out
    sft, rm, ppo = out / "sft", out / "rm", out / "ppo"
    times = {"sft": run("sft", "recipes/sft-lora-demo.yaml", sft)}
    times["rm"] = run("rm", "recipes/rm-demo.yaml", rm)
    sets = [f"model.name={sft}", f"rewards=[{{name: reward_model, path: {rm}}}]"]
    if args.ppo_steps:
        sets.append(f"train.max_steps={args.ppo_steps}")
    times["ppo"] = run("ppo", "recipes/ppo-demo.yaml", ppo, *sets)
    card = json.loads((ppo / "run_card.json").read_text())
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward" in r]
    m = card["metrics"]
    answers = held_out_answers(ppo)
    first, last = (min(answers), max(answers)) if answers else (None, None)
    summary = {
        "rm_eval_accuracy": rm_accuracy(rm),
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "ppo_steps": card["global_step"],
        "eval_reward_before": m.get("eval_reward_start"),
        "eval_reward_after": m.get("eval_reward"),
        "eval_exact_match_before": exact_match(answers.get(first, [])),
        "eval_exact_match_after": exact_match(answers.get(last, [])) if last != first else None,
        "eval_answers_after": [(r["prompt"], r["response"]) for r in answers.get(last, [])[:8]],
        "train_reward_first5": sum(r["reward"] for r in steps[:5]) / max(len(steps[:5]), 1),
        "train_reward_last5": sum(r["reward"] for r in steps[-5:]) / max(len(steps[-5:]), 1),
        "kl_last": steps[-1]["kl"] if steps else None,
        "kl_max": max((r["kl"] for r in steps), default=None),
        "response_length_first_last": [steps[0]["response_length"], steps[-1]["response_length"]] if steps else None,
        "rollout_tokens_per_s": sum(r["rollout_tokens_per_s"] for r in steps) / max(len(steps), 1),
        "update_tokens_per_s": sum(r["update_tokens_per_s"] for r in steps) / max(len(steps), 1),
        "rollout_seconds": m.get("rollout_seconds"),
        "update_seconds": m.get("update_seconds"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
