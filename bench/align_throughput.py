"""tunekit's alignment stages vs plain TRL scripts of the same method (bench/plain_trl_align.py): same model,
data, LoRA, steps, batch, side by side in one run, each path in its own process. Reports seconds per optimizer step
over the training loop (on_train_begin → on_train_end in both) and the process's peak RSS (os.wait4).

Methods: dpo, kto, orpo, simpo, cpo (preference pairs; kto takes each pair as two records, so it gets 2 x batch
records), grpo, gspo (grpo with the sequence-level ratio), rloo (math prompts, `--generations` x
`--completion-length` tokens), distill (the model distilled into a copy of itself, fully on-policy, so the teacher
costs the same in both paths).

    .venv/bin/python bench/align_throughput.py [--stages dpo grpo gspo kto orpo simpo cpo rloo distill] [--steps 8]
                                               [--plain-dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from sft_throughput import run_measured  # noqa: E402

ALIGN = ROOT / "tunekit/assets/align"
PAIRS, MATH, DEMO = ALIGN / "pref_train.jsonl", ALIGN / "math_train.jsonl", ROOT / "tunekit/assets/demo/train.jsonl"
DATA = {"dpo": PAIRS, "kto": PAIRS, "orpo": PAIRS, "simpo": PAIRS, "cpo": PAIRS, "grpo": MATH, "gspo": MATH,
        "rloo": MATH, "distill": DEMO}
COMMAND = {"cpo": "simpo", "gspo": "grpo"}  # cpo: simpo.variant=cpo; gspo: grpo with a sequence-level ratio


def method_sets(method: str, args) -> list[str]:
    """The method's own --set keys, matching the plain script's settings."""
    section = COMMAND.get(method, method)
    sampled = [f"{section}.max_completion_length={args.completion_length}"]
    if method in ("grpo", "gspo", "rloo"):
        sequence = ["grpo.importance_sampling_level=sequence", "grpo.loss_type=grpo"] if method == "gspo" else []
        return sampled + sequence + [f"{section}.num_generations={args.generations}", f"{section}.beta=0",
                                     f"{section}.log_completions_steps=0", "rewards=[{name: math_answer}]"]
    if method == "distill":
        return sampled + [f"distill.teacher={args.model}", "distill.lambda=1", "distill.beta=0.5"]
    return ["simpo.variant=cpo"] if method == "cpo" else []


def tunekit_path(method: str, args, out: Path) -> dict:
    batch = 2 * args.batch if method == "kto" else args.batch
    sets = [f"model.name={args.model}", f"data.train={DATA[method]}", "data.eval_split=0",
            f"data.max_length={args.max_length}", f"adapter.r={args.r}", "adapter.dropout=0",
            f"train.max_steps={args.steps}", f"train.batch_size={batch}", "train.save_steps=0",
            "train.lr=5e-5", "train.logging_steps=1", "generate.samples=0", "train.seed=0", "train.warmup_ratio=0",
            *method_sets(method, args)]
    cmd = [sys.executable, "-m", "tunekit", COMMAND.get(method, method), "--output", str(out), "--overwrite"]
    code, peak, _ = run_measured(cmd + [a for s in sets for a in ("--set", s)])
    if code != 0:
        raise SystemExit(f"tunekit {method} failed ({code})")
    card = json.loads((out / "run_card.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r and "eval_loss" not in r]
    tokens = [r["num_tokens"] for r in rows if "num_tokens" in r]
    return {"seconds": card["train_loop_seconds"], "steps": card["global_step"], "peak_rss_mib": peak,
            "completion_length": sum(lengths) / len(lengths) if lengths else None,
            "tokens": tokens[-1] if tokens else None}


def trl_path(method: str, args, out: Path) -> dict:
    batch = 2 * args.batch if method == "kto" else args.batch
    cmd = [sys.executable, str(ROOT / "bench" / "plain_trl_align.py"), method, "--model", args.model, "--data",
           str(DATA[method]), "--out", str(out), "--steps", str(args.steps), "--batch", str(batch), "--r",
           str(args.r), "--max-length", str(args.max_length), "--generations", str(args.generations),
           "--completion-length", str(args.completion_length), "--dtype", args.plain_dtype]
    code, peak, stdout = run_measured(cmd)
    if code != 0:
        raise SystemExit(f"plain TRL {method} failed ({code})")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mib"] = peak
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="+", default=["dpo", "grpo"], choices=list(DATA))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--plain-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights of the plain script (tunekit's auto: bf16 for a frozen bf16 base on a bf16 CPU)")
    args = ap.parse_args()
    if args.model == "smollm2-135m":
        from tunekit.models.load import resolve_model_path

        args.model = str(resolve_model_path("smollm2-135m"))
    print(f"model {Path(args.model).name}, LoRA r={args.r}, {args.steps} steps x batch {args.batch}, "
          f"plain TRL weights {args.plain_dtype}")
    print("| stage | path | s/step | mean completion tokens | input tokens | peak RSS MiB |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            rows = {"plain TRL": trl_path(stage, args, Path(tmp) / f"trl-{stage}"),
                    "tunekit": tunekit_path(stage, args, Path(tmp) / f"tk-{stage}")}
            for name, r in rows.items():
                r["s_per_step"] = r["seconds"] / r["steps"]
                length = "—" if r.get("completion_length") is None else f"{r['completion_length']:.1f}"
                tokens = "—" if r.get("tokens") is None else f"{r['tokens']:.0f}"
                print(f"| {stage} | {name} | {r['s_per_step']:.2f} | {length} | {tokens} | {r['peak_rss_mib']:.0f} |",
                      flush=True)
            a, b = rows["tunekit"], rows["plain TRL"]
            ratio = "—" if not (a.get("completion_length") and b.get("completion_length")) else \
                f"{a['completion_length'] / b['completion_length']:.3f}"
            print(f"| {stage} | tunekit / plain | {a['s_per_step'] / b['s_per_step']:.3f} | {ratio} | | "
                  f"{a['peak_rss_mib'] / b['peak_rss_mib']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
