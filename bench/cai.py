"""Benchmark: `tunekit cai --phase all` on the embedded SmolLM2-135M-Instruct with the shipped prompts, on CPU.

Runs the real CLI in a subprocess (peak RSS from `os.wait4`), then reads the run directory: wall time per phase
(cai_state.json), the share of revisions kept by the degenerate filter, the preference pairs kept, and, on the
shipped held-out prompts, how often the feedback model (the start model) prefers the final model's greedy answer
over the start model's (k principles, both orders averaged). Prints one JSON object and a few examples.

    .venv/bin/python bench/cai.py --output /tmp/tunekit-bench-cai [--recipe recipes/cai-demo.yaml] [--set K=V]...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="/tmp/tunekit-bench-cai")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cai-demo.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--examples", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "tunekit", "cai", args.recipe, "-o", str(out)]
    for s in args.sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"tunekit cai failed (exit {os.waitstatus_to_exitcode(status)})")
    phases = json.loads((out / "cai_state.json").read_text())["phases"]
    crit = phases["critique"]["stats"]
    fb = phases["feedback"]["stats"]
    ev = json.loads((out / "eval.json").read_text())
    result = {
        "command": " ".join(cmd),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "wall_seconds": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "phase_seconds": {k: v.get("seconds") for k, v in phases.items()},
        "revisions": crit["revisions"],
        "revisions_kept": crit["kept"],
        "kept_share": crit["kept_share"],
        "filtered": crit["filtered"],
        "sft_examples": crit["with_target"],
        "sft_metrics": {k: v for k, v in phases["sft"]["metrics"].items() if "loss" in k},
        "pairs": fb["pairs"],
        "pairs_kept": fb["kept"],
        "mean_confidence": fb["mean_confidence"],
        "p_label_a": fb["p_label_a"],
        "dpo_metrics": {k: v for k, v in phases.get("dpo", {}).get("metrics", {}).items()
                        if "loss" in k or "reward" in k},
        "eval": ev,
    }
    print(json.dumps(result, indent=2))
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [json.loads(x) for x in (out / "critique.jsonl").read_text().splitlines()]
    for r in [r for r in rows if r["final"]][: args.examples]:
        print(json.dumps({k: r[k] for k in ("prompt", "response", "principles", "critiques", "final")},
                         ensure_ascii=False, indent=1))
    for r in [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()][: args.examples]:
        print(json.dumps({k: r[k] for k in ("prompt", "start", "final", "p_final")}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
