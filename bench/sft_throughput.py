"""tunekit sft vs a plain TRL SFTTrainer script: same model, data, LoRA, steps; side by side in one run.

One run measures three settings: unpacked and packed at `--max-length` (default 256), and packed at
`--long-length` (default 2048, `--long-steps` x `--long-batch`). Each path runs in its own process; we report
training tokens/s (non-padding tokens over the training loop's wall time), the padding share of the batches,
and the process's peak RSS (os.wait4). Data: prompt/completion records of mixed lengths (answers of 1 to 60
words), loss on completions only in both paths. `--plain-loss` adds tunekit with `train.loss_impl=plain`,
`--checkpointing` adds tunekit with gradient checkpointing (which TRL's SFTConfig turns on by default),
`--trl-bf16` adds TRL with `bf16=True` (SFTConfig's default: autocast over fp32 weights; the plain row sets it
off), `--trl-bf16-weights` TRL on the model loaded in bf16 (what `model.dtype: auto` gives tunekit here).

    .venv/bin/python bench/sft_throughput.py [--model smollm2-135m] [--steps 12] [--batch 4] [--max-length 256]
        [--long-length 2048] [--long-steps 4] [--long-batch 1] [--only unpacked,packed,long] [--plain-loss]
        [--checkpointing] [--trl-bf16] [--trl-bf16-weights]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_BF16 = "plain TRL SFTTrainer, bf16 autocast"
WORDS = "alpha beta gamma delta river mountain cloud data model token answer quick brown fox jumps".split()


def make_data(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            k = rng.choice([1, 2, 4, 8, 16, 32, 60])
            answer = " ".join(rng.choice(WORDS) for _ in range(k))
            fh.write(json.dumps({"prompt": f"Write {k} words, record {i}.", "completion": answer}) + "\n")
    return path


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[int, float, str]:
    """(exit code, peak RSS in MiB of this child alone, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.stderr.write(err.read()[-3000:])
        return proc.returncode, usage.ru_maxrss / 1024, out.read()


def tunekit_path(args, data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "tunekit", "sft", "--output", str(out), "--overwrite",
           "--set", f"model.name={args.model}", "--set", f"data.train={data}", "--set", "data.eval_split=0",
           "--set", f"data.max_length={args.max_length}", "--set", f"data.packing={str(args.packing).lower()}",
           "--set", "adapter.method=lora", "--set", f"adapter.r={args.r}", "--set", "adapter.dropout=0",
           "--set", f"train.max_steps={args.steps}", "--set", f"train.batch_size={args.batch}",
           "--set", "train.save_steps=0", "--set", "train.logging_steps=1", "--set", "generate.samples=0",
           "--set", f"train.seed={args.seed}", *extra]
    code, peak, _ = run_measured(cmd, {"TUNEKIT_CACHE_DIR": str(out.parent / "cache")})
    if code != 0:
        raise SystemExit(f"tunekit path failed ({code})")
    card = json.loads((out / "run_card.json").read_text())
    return {"tokens": card["train_loop_tokens"], "seconds": card["train_loop_seconds"],
            "padding_share": card["padding_share"], "peak_rss_mib": peak}


def trl_path(args, data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "plain_trl_sft.py"), "--model", args.model, "--data", str(data),
           "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch), "--max-length",
           str(args.max_length), "--r", str(args.r), "--seed", str(args.seed), *extra]
    cmd += ["--packing"] if args.packing else []
    code, peak, stdout = run_measured(cmd)
    if code != 0:
        raise SystemExit(f"plain TRL path failed ({code})")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mib"] = peak
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--long-length", type=int, default=2048)
    ap.add_argument("--long-steps", type=int, default=4)
    ap.add_argument("--long-batch", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="unpacked,packed,long")
    ap.add_argument("--plain-loss", action="store_true", help="also run tunekit with train.loss_impl=plain")
    ap.add_argument("--checkpointing", action="store_true",
                    help="also run tunekit with train.gradient_checkpointing=true (TRL's SFTConfig default)")
    ap.add_argument("--trl-bf16", action="store_true",
                    help="also run TRL with bf16=True (SFTConfig's default: autocast over fp32 weights)")
    ap.add_argument("--trl-bf16-weights", action="store_true",
                    help="also run TRL on the model loaded in bf16 (fp32 LoRA by PEFT's default, no autocast)")
    args = ap.parse_args()
    if args.model == "smollm2-135m":  # the plain script gets the same cached folder tunekit uses
        sys.path.insert(0, str(ROOT))
        from tunekit.models.load import resolve_model_path

        args.model = str(resolve_model_path("smollm2-135m"))
    settings = {"unpacked": (False, args.max_length, args.steps, args.batch),
                "packed": (True, args.max_length, args.steps, args.batch),
                "long": (True, args.long_length, args.long_steps, args.long_batch)}
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "mixed.jsonl")
        for name in args.only.split(","):
            packing, length, steps, batch = settings[name]
            run = argparse.Namespace(**{**vars(args), "packing": packing, "max_length": length, "steps": steps,
                                        "batch": batch})
            paths = {"plain TRL SFTTrainer": lambda r=run, n=name: trl_path(r, data, Path(tmp) / f"trl-{n}"),
                     "tunekit sft": lambda r=run, n=name: tunekit_path(r, data, Path(tmp) / f"tk-{n}")}
            if args.trl_bf16:
                paths[TRL_BF16] = lambda r=run, n=name: trl_path(r, data, Path(tmp) / f"trlb-{n}", "--bf16")
            if args.trl_bf16_weights:
                paths["plain TRL SFTTrainer, bf16 weights"] = lambda r=run, n=name: trl_path(
                    r, data, Path(tmp) / f"trlw-{n}", "--weights-dtype", "bfloat16")
            if args.plain_loss:
                paths["tunekit sft, loss_impl=plain"] = lambda r=run, n=name: tunekit_path(
                    r, data, Path(tmp) / f"tkp-{n}", "--set", "train.loss_impl=plain")
            if args.checkpointing:
                paths["tunekit sft, gradient checkpointing"] = lambda r=run, n=name: tunekit_path(
                    r, data, Path(tmp) / f"tkc-{n}", "--set", "train.gradient_checkpointing=true")
            rows = {}
            for label, fn in paths.items():
                rows[label] = fn()
                print(f"{name} {label}: {rows[label]}", file=sys.stderr, flush=True)
            table.append((name, packing, length, steps, batch, rows))
    print(f"\nmodel {Path(args.model).name}, LoRA r={args.r}; ratios are tokens/s and peak RSS against TRL fp32"
          + (" / against TRL bf16 autocast" if args.trl_bf16 else ""))
    print("| setting | path | tokens | train s | tokens/s | vs TRL | padding share | peak RSS MiB | RSS vs TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for _name, packing, length, steps, batch, rows in table:
        bases = [rows["plain TRL SFTTrainer"]] + ([rows[TRL_BF16]] if TRL_BF16 in rows else [])
        for label, r in rows.items():
            tps = r["tokens"] / r["seconds"]
            speed = " / ".join(f"{tps / (b['tokens'] / b['seconds']):.2f}x" for b in bases)
            rss = " / ".join(f"{r['peak_rss_mib'] / b['peak_rss_mib']:.2f}x" for b in bases)
            setting = f"{'packed' if packing else 'unpacked'} {length}, {steps} x {batch}"
            print(f"| {setting} | {label} | {r['tokens']} | {r['seconds']:.1f} | {tps:.1f} | {speed} "
                  f"| {100 * r['padding_share']:.1f}% | {r['peak_rss_mib']:.0f} | {rss} |")


if __name__ == "__main__":
    main()
