"""KTO, ORPO, SimPO and CPO on the embedded model with the shipped preference data (CPU):

- `learning`: each demo recipe (recipes/{kto,orpo,simpo}-demo.yaml; cpo = simpo-demo with simpo.variant=cpo),
  then `tunekit eval` on the 64 held-out pairs (tunekit/assets/align/pref_eval.jsonl): the method's preference
  accuracy before (the start model) and after, the mean log-prob margin, optimizer steps and train wall time.
  kto: implicit-reward accuracy P[β(Δ_c) > β(Δ_r)] (0.5 at the start: policy = reference); orpo/simpo: per-token
  mean log-prob accuracy; cpo: summed log-prob accuracy.
- `throughput`: tunekit vs a plain TRL script of the same method (bench/plain_trl_pref.py: TRL 1.16 KTOTrainer,
  trl.experimental ORPOTrainer / CPOTrainer) on the same model, data, LoRA r, batch and steps, side by side in one
  run, each path in its own process: s/step over the training loop and peak RSS (os.wait4).

    .venv/bin/python bench/pref_methods.py learning [--methods kto orpo simpo cpo] [--out runs/bench-pref]
    .venv/bin/python bench/pref_methods.py throughput [--methods kto orpo simpo cpo] [--steps 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

PAIRS = ROOT / "tunekit" / "assets" / "align" / "pref_train.jsonl"
HELD_OUT = ROOT / "tunekit" / "assets" / "align" / "pref_eval.jsonl"
METHODS = ("kto", "orpo", "simpo", "cpo")
STAGE = {"kto": "kto", "orpo": "orpo", "simpo": "simpo", "cpo": "simpo"}
EXTRA = {"cpo": ["simpo.variant=cpo"]}


def tunekit_json(*args: str) -> dict | None:
    res = subprocess.run([sys.executable, "-m", "tunekit", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"tunekit {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else None


def start_accuracy(method: str, model: str) -> dict:
    """The start model's accuracy under the method's own reward (kto: 0.5 by construction)."""
    from tunekit.data.preference import to_preference
    from tunekit.data.sources import read_source
    from tunekit.evaluation.preference import logprob_accuracy, reference_free_accuracy
    from tunekit.models.trained import load_any

    pairs = [to_preference(r.data, "auto", r.where) for r in read_source(str(HELD_OUT))]
    policy, tok = load_any(model)
    base = logprob_accuracy(policy, tok, pairs)
    if method == "kto":
        return {"preference_accuracy": 0.5, **base}
    return {**reference_free_accuracy(policy, tok, pairs, method != "cpo"), **base}


def learning(args) -> None:
    out = Path(args.out)
    print("| method | held-out preference accuracy: start | tuned | log-prob margin start | tuned | steps | "
          "train wall s |\n|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for method in args.methods:
        run = out / method
        sets = [a for s in EXTRA.get(method, []) + args.sets for a in ("--set", s)]
        subprocess.run([sys.executable, "-m", "tunekit", STAGE[method], f"recipes/{STAGE[method]}-demo.yaml",
                        "--output", str(run), "--overwrite", *sets], cwd=ROOT, check=True)
        card = json.loads((run / "run_card.json").read_text())
        before = start_accuracy(method, "smollm2-135m")  # the demo recipes start from the embedded model
        after = tunekit_json("eval", str(run), "--data", str(HELD_OUT))
        print(f"| {method} | {before['preference_accuracy']:.3f} | {after['preference_accuracy']:.3f} | "
              f"{before['mean_logprob_margin']:.2f} | {after.get('mean_logprob_margin', float('nan')):.2f} | "
              f"{card['global_step']} | {card['train_seconds']:.0f} |", flush=True)


def throughput(args) -> None:
    from sft_throughput import run_measured

    model = args.model
    if model == "smollm2-135m":
        from tunekit.models.load import resolve_model_path

        model = str(resolve_model_path("smollm2-135m"))
    print(f"model {Path(model).name}, LoRA r={args.r}, {args.steps} steps x batch {args.batch} pairs "
          "(kto: 2 x batch records)")
    print("| method | plain TRL s/step | tunekit s/step | tunekit / plain | plain RSS MiB | tunekit RSS MiB | "
          "RSS ratio |\n|---|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            batch = 2 * args.batch if method == "kto" else args.batch  # a pair = two KTO records
            plain_cmd = [sys.executable, str(ROOT / "bench" / "plain_trl_pref.py"), method, "--model", model,
                         "--data", str(PAIRS), "--out", f"{tmp}/trl-{method}", "--steps", str(args.steps),
                         "--batch", str(batch), "--r", str(args.r), "--max-length", str(args.max_length)]
            code, plain_rss, stdout = run_measured(plain_cmd)
            if code != 0:
                raise SystemExit(f"plain TRL {method} failed ({code})")
            plain = json.loads(stdout.strip().splitlines()[-1])
            out = Path(tmp) / f"tk-{method}"
            sets = [f"model.name={model}", f"data.train={PAIRS}", "data.eval_split=0",
                    f"data.max_length={args.max_length}", f"adapter.r={args.r}", "adapter.dropout=0",
                    f"train.max_steps={args.steps}", f"train.batch_size={batch}", "train.save_steps=0",
                    "train.lr=5e-5", "train.logging_steps=1", "generate.samples=0", "train.seed=0",
                    "train.warmup_ratio=0", *EXTRA.get(method, [])]
            cmd = [sys.executable, "-m", "tunekit", STAGE[method], "--output", str(out), "--overwrite"]
            code, tk_rss, _ = run_measured(cmd + [a for s in sets for a in ("--set", s)])
            if code != 0:
                raise SystemExit(f"tunekit {method} failed ({code})")
            card = json.loads((out / "run_card.json").read_text())
            p, t = plain["seconds"] / plain["steps"], card["train_loop_seconds"] / card["global_step"]
            print(f"| {method} | {p:.2f} | {t:.2f} | {t / p:.3f} | {plain_rss:.0f} | {tk_rss:.0f} | "
                  f"{tk_rss / plain_rss:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    learn = sub.add_parser("learning", help="held-out preference accuracy before/after each demo recipe")
    learn.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    learn.add_argument("--out", default="runs/bench-pref")
    learn.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    speed = sub.add_parser("throughput", help="tunekit vs a plain TRL script, s/step and peak RSS")
    speed.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    speed.add_argument("--model", default="smollm2-135m")
    speed.add_argument("--steps", type=int, default=8)
    speed.add_argument("--batch", type=int, default=4)
    speed.add_argument("--r", type=int, default=8)
    speed.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    learning(args) if args.mode == "learning" else throughput(args)


if __name__ == "__main__":
    main()
