"""Did alignment make the embedded model better? The sft run of `make demo` (recipes/sft-lora-demo.yaml) and the
dpo run of recipes/dpo-demo.yaml, each against the base model (smollm2-135m):

1. the shipped local lm_eval tasks (tunekit_demo: exact match on the demo's held-out split; tunekit_pref:
   multiple-choice log-likelihood accuracy on the held-out preference pairs), with the chat template applied;
2. the pairwise win rate on CAI's held-out prompts, judged by the base model itself (the judge is the same model
   as the baseline: its own bias favours the baseline, if anything).

Runs that already exist are reused (pass --retrain to train them again). Prints one markdown table with wall times.

    .venv/bin/python bench/eval_alignment.py [--out runs/bench-eval] [--judge smollm2-135m] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tunekit" / "assets" / "cai" / "prompts_heldout.jsonl"
BASE = "smollm2-135m"


def tunekit(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    print("$ tunekit " + " ".join(args), flush=True)
    res = subprocess.run([sys.executable, "-m", "tunekit", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"tunekit {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "{}"
    return json.loads(last) if last.startswith("{") else {}, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-eval")
    ap.add_argument("--judge", default=BASE, help="judge model (default: the base model itself)")
    ap.add_argument("--limit", type=int, default=None, help="items per task / judged prompts (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    out = ROOT / args.out
    runs = {"sft (make demo)": (out / "sft", "sft", "recipes/sft-lora-demo.yaml"),
            "dpo (dpo-demo)": (out / "dpo", "dpo", "recipes/dpo-demo.yaml")}
    limit = ["--limit", str(args.limit)] if args.limit else []
    rows = []
    for label, (run, stage, recipe) in runs.items():
        train_s = None
        if args.retrain or not (run / "run_card.json").is_file():
            _, train_s = tunekit(stage, recipe, "--output", str(run), "--overwrite")
        tasks, tasks_s = tunekit("eval", str(run), "--tasks", "tunekit_demo,tunekit_pref", "--apply-chat-template",
                                 "--against", BASE, *limit, "-o", str(out / f"{stage}-tasks.json"), "--overwrite")
        judged, judge_s = tunekit("eval", str(run), "--against", BASE, "--judge", args.judge, "--data", str(PROMPTS),
                                  "--max-new-tokens", str(args.max_new_tokens), *limit,
                                  "-o", str(out / f"{stage}-judge" / "eval.json"), "--overwrite")
        rows.append((label, tasks["metrics"], tasks_s, judged["metrics"], judge_s, train_s,
                     judged.get("warnings", [])))
    print(f"\nbase {BASE}; judge {args.judge}; prompts {PROMPTS.name}")
    print("| run | tunekit_demo exact match (base → run) | tunekit_pref acc (base → run) | win rate vs base "
          "[95% CI] | LC win rate | position-bias rate | mean length run / base | tasks s | judge s | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, tm, ts, jm, js, train_s, _ in rows:
        em, acc, wr = tm["tunekit_demo/exact_match"], tm["tunekit_pref/acc"], jm["win_rate"]
        lc = jm["length_controlled_win_rate"]["value"]
        print(f"| {label} | {em['baseline']['value']:.3f} → {em['value']:.3f} | "
              f"{acc['baseline']['value']:.3f} → {acc['value']:.3f} | {wr['value']:.3f} "
              f"[{wr['ci'][0]:.3f}, {wr['ci'][1]:.3f}] | {'—' if lc is None else f'{lc:.3f}'} | "
              f"{jm['position_bias_rate']['value']:.3f} | {jm['mean_length_target']['value']:.0f} / "
              f"{jm['mean_length_baseline']['value']:.0f} | {ts:.0f} | {js:.0f} | "
              f"{'reused' if train_s is None else f'{train_s:.0f}'} |")
    for label, *_, warnings in rows:
        for w in warnings:
            print(f"warning ({label}): {w}")


if __name__ == "__main__":
    main()
