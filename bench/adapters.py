"""Benchmark: the same short SFT task with each adapter method (LoRA, DoRA, PiSSA, MiLoRA, LoRA-XS, SVFT).

Embedded SmolLM2-135M-Instruct, the bundled terse-answer data (tunekit/assets/demo/{train,eval}.jsonl; a small
generated jsonl if absent), same steps, batch and sequence length for every method. Each method runs in its
own subprocess (`tunekit.stages.sft.run_sft`), so peak memory is that process's peak RSS (`ru_maxrss` from
`os.wait4`; on CUDA also `torch.cuda.max_memory_allocated`). Seconds per step = the trainer's train time /
steps (attach-time SVDs excluded, reported separately as setup seconds = wall − train time, which includes
model load, SVD, eval and sample generation).

    .venv/bin/python bench/adapters.py --workdir /tmp/tunekit-bench-adapters [--steps 30] [--model smollm2-135m]

Prints a markdown table (the adapters section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (adapter settings, learning rate). LoRA-family at r=8; LoRA-XS and SVFT at their usual scales
# (they train far fewer parameters and use larger learning rates in their papers).
METHODS: dict[str, tuple[dict, float]] = {
    "lora r=8": ({"method": "lora", "r": 8}, 1e-3),
    "dora r=8": ({"method": "dora", "r": 8}, 1e-3),
    "pissa r=8": ({"method": "pissa", "r": 8}, 1e-3),
    "milora r=8": ({"method": "milora", "r": 8}, 1e-3),
    "lora_xs r=64": ({"method": "lora_xs", "r": 64}, 2e-4),
    "svft plain": ({"method": "svft", "svft": {"pattern": "plain"}}, 5e-3),
    "svft banded d=8": ({"method": "svft", "svft": {"pattern": "banded", "d": 8}}, 5e-3),
}


def _data(workdir: Path) -> tuple[Path, Path]:
    demo = ROOT / "tunekit" / "assets" / "demo"
    if (demo / "train.jsonl").is_file() and (demo / "eval.jsonl").is_file():
        return demo / "train.jsonl", demo / "eval.jsonl"
    rows = [{"instruction": f"What is {a} plus {b}? Answer with the number only.", "output": str(a + b)}
            for a in range(12) for b in range(12)]
    train, ev = workdir / "train.jsonl", workdir / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-24]))
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows[-24:]))
    return train, ev


def worker(spec: dict) -> None:
    """Run one SFT in this process; print one JSON line with the figures."""
    import torch

    from tunekit.config.schema import Recipe
    from tunekit.stages.sft import run_sft

    recipe = Recipe.model_validate(spec["recipe"])
    started = time.perf_counter()
    result = run_sft(recipe, overwrite=True)
    wall = time.perf_counter() - started
    run = Path(getattr(result, "path", result))
    card = json.loads((run / "run_card.json").read_text())
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("BENCH " + json.dumps({"wall": wall, "card": card, "cuda_peak_mib": cuda_peak}))


def run_one(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    adapter, lr = METHODS[name]
    train, ev = _data(workdir)
    recipe = {
        "model": {"name": args.model},
        "data": {"train": str(train), "eval": str(ev), "max_length": 128},
        "adapter": {"dropout": 0.0, "targets": "all-linear", **adapter},
        "train": {"max_steps": args.steps, "lr": lr, "warmup_ratio": 0.1, "batch_size": args.batch_size,
                  "save_steps": 0, "logging_steps": 5, "seed": 0},
        "generate": {"samples": 0},
        "output": str(workdir / re.sub(r"[^a-z0-9]+", "-", name)),
    }
    cmd = [sys.executable, __file__, "--worker", json.dumps({"recipe": recipe})]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    if rc != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}")
    data = json.loads(line[len("BENCH "):])
    trainable = re.search(r"([\d,]+) trainable", out)
    card = data["card"]
    steps = card["global_step"]
    return {
        "name": name,
        "lr": lr,
        "trainable": int(trainable.group(1).replace(",", "")) if trainable else None,
        "s_per_step": card["train_seconds"] / max(steps, 1),
        "setup_s": wall - card["train_seconds"],
        "peak_rss_mib": _peak_rss_mib(usage),
        "cuda_peak_mib": data["cuda_peak_mib"],
        "train_loss": card["metrics"].get("train_loss"),
        "eval_loss": card["metrics"].get("eval_loss"),
    }


def _peak_rss_mib(usage) -> float:
    return usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunekit-bench-adapters"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="Subset of methods (names as in the table).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, args.workdir, args) for name in (args.only or METHODS)]
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.model}, {args.steps} steps x batch {args.batch_size}, max_length 128, {device}, "
          f"torch {torch.__version__}, {platform.python_version()}\n")
    mem = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"| method | trainable params | lr | s/step | setup s | {mem} | train loss | eval loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = r["cuda_peak_mib"] if r["cuda_peak_mib"] is not None else r["peak_rss_mib"]
        print(f"| {r['name']} | {r['trainable']:,} | {r['lr']:g} | {r['s_per_step']:.2f} | {r['setup_s']:.0f} | "
              f"{peak:,.0f} | {r['train_loss']:.3f} | {r['eval_loss']:.3f} |")
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
