"""Benchmark: `tunekit run recipes/pipelines/assistant-demo.yaml` end to end on the embedded model, then again
fully cached (the caching overhead), each in its own process; wall time per stage from OUT/pipeline.json.

    .venv/bin/python bench/pipeline.py [--output /tmp/tunekit-bench-pipeline] [--pipeline FILE] [--keep]

Prints a markdown table (stage, command, wall time of the first run, status of the second) and the wall time
of both runs, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(pipeline: Path, output: Path) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunekit", "run", str(pipeline), "--output", str(output)],
                          cwd=ROOT, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"tunekit run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads((output / "pipeline.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "recipes/pipelines/assistant-demo.yaml")
    parser.add_argument("--output", type=Path, default=Path("/tmp/tunekit-bench-pipeline"))
    parser.add_argument("--keep", action="store_true", help="Keep the output folder afterwards.")
    args = parser.parse_args()
    if args.output.exists():
        shutil.rmtree(args.output)
    first, record = run(args.pipeline, args.output)
    second, cached = run(args.pipeline, args.output)
    print(f"pipeline {args.pipeline.name}: first run {first:.1f} s, fully cached run {second:.1f} s "
          "(process start and imports included)")
    print("\n| stage | command | wall time (first run) | second run |\n|---|---|---|---|")
    for name, entry in record["stages"].items():
        print(f"| {name} | {entry['command']} | {entry['seconds']:.1f} s | {cached['stages'][name]['status']} |")
    print("\n" + (args.output / "report.md").read_text())
    if not args.keep:
        shutil.rmtree(args.output)


if __name__ == "__main__":
    main()
