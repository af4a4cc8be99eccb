"""`make demo`: the main job end to end through the real CLI on the embedded default model.

1. `tunekit eval smollm2-135m` on the held-out split (before), 2. `tunekit sft recipes/sft-lora-demo.yaml`,
3. `tunekit eval runs/demo` (after). Prints both scores and sample generations; fails if after ≤ before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sft-lora-demo.yaml"
EVAL = ROOT / "tunekit" / "assets" / "demo" / "eval.jsonl"
RUN = ROOT / "runs" / "demo"


def tunekit(*args: str) -> str:
    cmd = [sys.executable, "-m", "tunekit", *args]
    print("$ tunekit " + " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode != 0:
        sys.exit(f"demo: `tunekit {' '.join(args)}` failed with exit code {res.returncode}")
    return res.stdout


def score(target: str) -> dict:
    """{metric: value} of `tunekit eval` (its stdout line is the eval.json summary)."""
    out = tunekit("eval", target, "--data", str(EVAL), "--max-new-tokens", "16", "--max-length", "128")
    return {k: v["value"] for k, v in json.loads(out.strip().splitlines()[-1])["metrics"].items()}


def main() -> None:
    t0 = time.perf_counter()
    before = score("smollm2-135m")
    tunekit("sft", str(RECIPE), "--output", str(RUN), "--overwrite")
    after = score(str(RUN))
    print()
    print(f"{'held-out (32 records)':<24}{'before':>10}{'after':>10}")
    print(f"{'perplexity (answers)':<24}{before['perplexity']:>10.3f}{after['perplexity']:>10.3f}")
    print(f"{'exact match':<24}{before['exact_match']:>10.3f}{after['exact_match']:>10.3f}")
    samples = RUN / "samples.jsonl"
    if samples.is_file():
        print("\nsample generations (after):")
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            print(f"  Q: {s['prompt'][-1]['content']}\n  A: {s['generation']!r}  (reference {s['reference']!r})")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; run directory: {RUN}")
    if not after["perplexity"] < before["perplexity"]:
        sys.exit("demo: the tuned model did not beat the base model on held-out perplexity")


if __name__ == "__main__":
    main()
