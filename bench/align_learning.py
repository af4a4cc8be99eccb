"""Learning is real: rm, dpo and grpo on the embedded model with the shipped data, on CPU, before/after.

- rm: held-out pairwise accuracy P[r(x, y_c) > r(x, y_r)] (chance 0.5);
- dpo: held-out log-prob accuracy P[log π(y_c|x) > log π(y_r|x)] of the start model and of the tuned policy,
  and the tuned policy's implicit-reward accuracy;
- grpo: held-out math_answer reward (exact match of the final number) of greedy answers, start vs tuned.

    .venv/bin/python bench/align_learning.py [--stages rm dpo grpo] [--out runs/bench-align]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIGN = ROOT / "tunekit" / "assets" / "align"


def tunekit(*args: str) -> tuple[dict | None, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tunekit", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"tunekit {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    doc = json.loads(last) if last.startswith("{") else None
    if doc is not None and "metrics" in doc:  # an eval.json summary: {metric: value}
        doc = {k: v["value"] for k, v in doc["metrics"].items()}
    return doc, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="+", default=["rm", "dpo", "grpo"])
    ap.add_argument("--out", default="runs/bench-align")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra --set for every stage (STAGE:KEY=VALUE for one stage only)")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for stage in args.stages:
        run = out / stage
        mine = [s.split(":", 1)[1] if s.startswith(f"{stage}:") else s for s in args.sets
                if ":" not in s.split("=", 1)[0] or s.startswith(f"{stage}:")]
        extra = [a for s in mine for a in ("--set", s)]
        _, train_s = tunekit(stage, f"recipes/{stage}-demo.yaml", "--output", str(run), "--overwrite", *extra)
        card = json.loads((run / "run_card.json").read_text())
        if stage == "rm":
            after, _ = tunekit("eval", str(run), "--data", str(ALIGN / "pref_eval.jsonl"))
            rows.append((stage, "pairwise accuracy", 0.5, after["pairwise_accuracy"], card, train_s))
        elif stage == "dpo":
            before, _ = tunekit("eval", "smollm2-135m", "--data", str(ALIGN / "pref_eval.jsonl"))
            after, _ = tunekit("eval", str(run), "--data", str(ALIGN / "pref_eval.jsonl"))
            rows.append((stage, "log-prob accuracy", before["logprob_accuracy"], after["logprob_accuracy"], card,
                         train_s))
            rows.append((stage, "mean log-prob margin (nats)", before["mean_logprob_margin"],
                         after["mean_logprob_margin"], card, train_s))
            rows.append((stage, "implicit-reward accuracy", None, after["implicit_reward_accuracy"], card, train_s))
        else:
            flags = ["--data", str(ALIGN / "math_eval.jsonl"), "--reward", "math_answer", "--max-new-tokens", "48"]
            before, _ = tunekit("eval", "smollm2-135m", *flags)
            after, _ = tunekit("eval", str(run), *flags)
            key = "rewards/math_answer/mean"
            rows.append((stage, "math_answer (exact match)", before[key], after[key], card, train_s))
        print(json.dumps({"stage": stage, "metric": rows[-1][1], "before": rows[-1][2], "after": rows[-1][3]}),
              flush=True)
    print("| stage | held-out metric | start | tuned | steps | train wall s |\n|---|---|---|---|---|---|")
    for stage, metric, before, after, card, seconds in rows:
        b = "—" if before is None else f"{before:.3f}"
        print(f"| {stage} | {metric} | {b} | {after:.3f} | {card['global_step']} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
