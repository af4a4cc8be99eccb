"""RLOO, GSPO and on-policy distillation learning on the embedded model with the shipped data (CPU): the demo
recipes, before/after on held-out data:
  - rloo (recipes/rloo-demo.yaml) and gspo (recipes/gspo-demo.yaml, `tunekit grpo`): mean math_answer reward of
    greedy answers on tunekit/assets/align/math_eval.jsonl, start model vs tuned;
  - distill (recipes/distill-demo.yaml): the `make demo` sft run (teacher, its LoRA folded in) into the base;
    perplexity and exact match on tunekit/assets/demo/eval.jsonl of the base (student before), the distilled
    student and the teacher. The teacher is runs/demo, trained first with recipes/sft-lora-demo.yaml if missing;
  steps and wall time of each training run.

Throughput against plain TRL is bench/align_throughput.py --stages rloo distill.

    .venv/bin/python bench/rl_methods.py [--methods rloo gspo distill] [--out runs/bench-rl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
ALIGN = ROOT / "tunekit" / "assets" / "align"
DEMO = ROOT / "tunekit" / "assets" / "demo"


def tunekit(*args: str) -> tuple[dict | None, float]:
    """Run `tunekit ARGS`; (its last stdout line as JSON if it is one, wall seconds)."""
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


def learning(methods: list[str], out: Path) -> list[tuple]:
    rows = []
    math = ["--data", str(ALIGN / "math_eval.jsonl"), "--reward", "math_answer", "--max-new-tokens", "48"]
    key = "rewards/math_answer/mean"
    for method in [m for m in methods if m in ("rloo", "gspo")]:
        run = out / method
        command, recipe = ("rloo", "rloo-demo") if method == "rloo" else ("grpo", "gspo-demo")
        _, seconds = tunekit(command, f"recipes/{recipe}.yaml", "--output", str(run), "--overwrite")
        card = json.loads((run / "run_card.json").read_text())
        before, _ = tunekit("eval", "smollm2-135m", *math)
        after, _ = tunekit("eval", str(run), *math)
        rows.append((method, "math_answer reward", before[key], after[key], None, card["global_step"], seconds))
    if "distill" in methods:
        teacher = ROOT / "runs" / "demo"
        if not (teacher / "recipe.yaml").is_file():
            tunekit("sft", "recipes/sft-lora-demo.yaml", "--output", str(teacher))
        run = out / "distill"
        _, seconds = tunekit("distill", "recipes/distill-demo.yaml", "--set", f"distill.teacher={teacher}",
                             "--output", str(run), "--overwrite")
        card = json.loads((run / "run_card.json").read_text())
        held = ["--data", str(DEMO / "eval.jsonl"), "--max-new-tokens", "16"]
        before, _ = tunekit("eval", "smollm2-135m", *held)
        after, _ = tunekit("eval", str(run), *held)
        ref, _ = tunekit("eval", str(teacher), *held)
        for metric in ("perplexity", "exact_match"):
            rows.append(("distill", metric, before[metric], after[metric], ref[metric], card["global_step"], seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rloo", "gspo", "distill"], choices=["rloo", "gspo", "distill"])
    ap.add_argument("--out", default="runs/bench-rl")
    args = ap.parse_args()
    rows = learning(args.methods, Path(args.out))
    print("| method | held-out metric | start | tuned | teacher | steps | train wall s |")
    print("|---|---|---|---|---|---|---|")
    for method, metric, before, after, ref, steps, seconds in rows:
        r = "—" if ref is None else f"{ref:.3f}"
        print(f"| {method} | {metric} | {before:.3f} | {after:.3f} | {r} | {steps} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
