"""RLOO, GSPO and on-policy distillation on the embedded model with the shipped data (CPU), in two parts:

learning — the demo recipes, before/after on held-out data:
  - rloo (recipes/rloo-demo.yaml) and gspo (recipes/gspo-demo.yaml, `tunekit grpo`): mean math_answer reward of
    greedy answers on tunekit/assets/align/math_eval.jsonl, start model vs tuned;
  - distill (recipes/distill-demo.yaml): the `make demo` sft run (teacher, its LoRA folded in) into the base;
    perplexity and exact match on tunekit/assets/demo/eval.jsonl of the base (student before), the distilled
    student and the teacher. The teacher is runs/demo, trained first with recipes/sft-lora-demo.yaml if missing;
  steps and wall time of each training run.

throughput — `tunekit rloo` / `tunekit distill` against a plain TRL script of the same trainer (RLOOTrainer,
DistillationTrainer + PEFT LoRA, written as a user would: `--plain rloo|distill`), same model, data, LoRA, steps
and batch, side by side in one run, each in its own process: seconds per optimizer step over the training loop
(on_train_begin → on_train_end in both) and the process's peak RSS.

    .venv/bin/python bench/rl_methods.py [--parts learning throughput] [--methods rloo gspo distill]
                                         [--out runs/bench-rl] [--steps 8] [--batch 4]
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


# ------------------------------------------------------------------ throughput


def plain_trl(method: str, model_dir: str, out: str, steps: int, batch: int, r: int, generations: int,
              completion_length: int) -> None:
    """The plain-library baseline: TRL's RLOOTrainer / DistillationTrainer + PEFT LoRA, as a user writes it.
    Prints one JSON line {"seconds": training-loop wall time, "steps"}."""
    import re

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer, RLOOConfig, RLOOTrainer

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.t0

    def last_number_reward(completions, answer, **kwargs):
        found = [re.findall(r"-?\d+", (c[-1]["content"] if isinstance(c, list) else c).replace(",", ""))
                 for c in completions]
        return [float(bool(f) and f[-1] == a.split("####")[-1].strip()) for f, a in zip(found, answer)]

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-5,
                  logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
                  use_cpu=True, seed=0, max_completion_length=completion_length)
    peft = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = LoopTimer()
    if method == "rloo":
        data = load_dataset("json", data_files=str(ALIGN / "math_train.jsonl"), split="train")
        data = data.map(lambda x: {"prompt": [{"role": "user", "content": x["prompt"]}]})
        trainer = RLOOTrainer(model=model, reward_funcs=[last_number_reward], train_dataset=data,
                              args=RLOOConfig(**common, num_generations=generations, beta=0.0),
                              processing_class=tok, peft_config=peft, callbacks=[timer])
    else:
        data = load_dataset("json", data_files=str(DEMO / "train.jsonl"), split="train")
        data = data.map(lambda x: {"prompt": [{"role": "user", "content": x["instruction"]}]})
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
        trainer = DistillationTrainer(model=model, teacher_model=teacher, train_dataset=data,
                                      args=DistillationConfig(**common, beta=0.5), processing_class=tok,
                                      peft_config=peft, callbacks=[timer])
    trainer.train()
    print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step}))


def throughput(methods: list[str], args, out: Path) -> list[dict]:
    from sft_throughput import run_measured

    from tunekit.models.load import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    results = []
    for method in [m for m in methods if m in ("rloo", "distill")]:
        sets = [f"model.name={args.model}", "data.eval_split=0", f"adapter.r={args.r}", "adapter.dropout=0",
                f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.save_steps=0",
                "train.lr=5e-5", "train.logging_steps=1", "generate.samples=0", "train.seed=0",
                "train.warmup_ratio=0"]
        if method == "rloo":
            sets += [f"data.train={ALIGN / 'math_train.jsonl'}", f"rloo.num_generations={args.generations}",
                     f"rloo.max_completion_length={args.completion_length}", "rloo.beta=0",
                     "rloo.log_completions_steps=0", "rewards=[{name: math_answer}]"]
        else:  # the model distils into itself: same teacher cost as the plain script
            sets += [f"data.train={DEMO / 'train.jsonl'}", f"distill.teacher={args.model}", "distill.lambda=1",
                     f"distill.max_completion_length={args.completion_length}"]
        run = out / f"tp-{method}"
        cmd = [sys.executable, "-m", "tunekit", method, "--output", str(run), "--overwrite"]
        code, peak, _ = run_measured(cmd + [a for s in sets for a in ("--set", s)])
        if code != 0:
            raise SystemExit(f"tunekit {method} failed ({code})")
        card = json.loads((run / "run_card.json").read_text())
        ours = {"seconds": card["train_loop_seconds"], "steps": card["global_step"], "peak_rss_mib": peak}
        cmd = [sys.executable, __file__, "--plain", method, "--model-dir", model_dir,
               "--out", str(out / f"tp-trl-{method}"), "--steps", str(args.steps), "--batch", str(args.batch),
               "--r", str(args.r),
               "--generations", str(args.generations), "--completion-length", str(args.completion_length)]
        code, peak, stdout = run_measured(cmd)
        if code != 0:
            raise SystemExit(f"plain TRL {method} failed ({code})")
        theirs = {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mib": peak}
        for who, res in (("tunekit", ours), ("plain TRL", theirs)):
            res.update(method=method, path=who, s_per_step=res["seconds"] / max(res["steps"], 1))
            print(json.dumps(res), flush=True)
            results.append(res)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["learning", "throughput"], choices=["learning", "throughput"])
    ap.add_argument("--methods", nargs="+", default=["rloo", "gspo", "distill"], choices=["rloo", "gspo", "distill"])
    ap.add_argument("--out", default="runs/bench-rl")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--plain", choices=["rloo", "distill"], help=argparse.SUPPRESS)  # the baseline's own process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        plain_trl(args.plain, args.model_dir, args.out, args.steps, args.batch, args.r, args.generations,
                  args.completion_length)
        return
    out = Path(args.out)
    if "learning" in args.parts:
        rows = learning(args.methods, out)
        print("| method | held-out metric | start | tuned | teacher | steps | train wall s |")
        print("|---|---|---|---|---|---|---|")
        for method, metric, before, after, ref, steps, seconds in rows:
            r = "—" if ref is None else f"{ref:.3f}"
            print(f"| {method} | {metric} | {before:.3f} | {after:.3f} | {r} | {steps} | {seconds:.0f} |")
    if "throughput" in args.parts:
        res = throughput(args.methods, args, out)
        print("| method | path | s/step | peak RSS MiB |\n|---|---|---|---|")
        for x in res:
            print(f"| {x['method']} | {x['path']} | {x['s_per_step']:.2f} | {x['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
