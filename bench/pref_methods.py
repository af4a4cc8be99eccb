"""KTO, ORPO, SimPO and CPO learning on the embedded model with the shipped preference data (CPU): each demo
recipe (recipes/{kto,orpo,simpo}-demo.yaml; cpo = simpo-demo with simpo.variant=cpo), then `tunekit eval` on the
64 held-out pairs (tunekit/assets/align/pref_eval.jsonl): the method's preference accuracy before (the start model)
and after, the mean log-prob margin, optimizer steps and train wall time. kto: implicit-reward accuracy
P[β(Δ_c) > β(Δ_r)] (0.5 at the start: policy = reference); orpo/simpo: per-token mean log-prob accuracy; cpo: summed
log-prob accuracy.

Throughput against plain TRL is bench/align_throughput.py --stages kto orpo simpo cpo.

    .venv/bin/python bench/pref_methods.py [--methods kto orpo simpo cpo] [--out runs/bench-pref]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

HELD_OUT = ROOT / "tunekit" / "assets" / "align" / "pref_eval.jsonl"
METHODS = ("kto", "orpo", "simpo", "cpo")
STAGE = {"kto": "kto", "orpo": "orpo", "simpo": "simpo", "cpo": "simpo"}
EXTRA = {"cpo": ["simpo.variant=cpo"]}


def tunekit_json(*args: str) -> dict | None:
    res = subprocess.run([sys.executable, "-m", "tunekit", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"tunekit {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    doc = json.loads(last) if last.startswith("{") else None
    if doc is not None and "metrics" in doc:  # an eval.json document: {metric: value}
        doc = {k: v["value"] for k, v in doc["metrics"].items()}
    return doc


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
        if not (args.reuse and (run / "run_card.json").is_file()):
            subprocess.run([sys.executable, "-m", "tunekit", STAGE[method], f"recipes/{STAGE[method]}-demo.yaml",
                            "--output", str(run), "--overwrite", *sets], cwd=ROOT, check=True)
        card = json.loads((run / "run_card.json").read_text())
        before = start_accuracy(method, "smollm2-135m")  # the demo recipes start from the embedded model
        after = tunekit_json("eval", str(run), "--data", str(HELD_OUT))
        key = "implicit_reward_accuracy" if method == "kto" else "preference_accuracy"  # what eval prints per kind
        print(f"| {method} | {before['preference_accuracy']:.3f} | {after[key]:.3f} | "
              f"{before['mean_logprob_margin']:.2f} | {after.get('mean_logprob_margin', float('nan')):.2f} | "
              f"{card['global_step']} | {card['train_seconds']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", default="runs/bench-pref")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--reuse", action="store_true", help="evaluate a finished run in --out instead of training again")
    learning(ap.parse_args())


if __name__ == "__main__":
    main()
