"""`tunekit eval --tasks` vs lm-evaluation-harness run directly: same model folder, tasks, limit, batch size.

Each path runs in its own process. Reported per path: items/s over the evaluation itself (simple_evaluate,
after the model is loaded) and the wall time of the whole command (`tunekit eval ...` vs `lm_eval ...`: imports,
task index, model load included). The goal (issue: eval with benchmarks): tunekit no more than 5% slower.

    .venv/bin/python bench/eval_throughput.py [--model smollm2-135m] [--tasks tunekit_demo,tunekit_pref]
        [--limit 32] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TASKS_DIR = ROOT / "tunekit" / "assets" / "tasks"


def _folder_and_dtype(model: str) -> tuple[str, str]:
    """The model folder lm_eval loads and the dtype tunekit would load it in (so both compute the same)."""
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import resolve_dtype, resolve_model_path

    dtype = resolve_dtype(ModelConfig(name=model))  # as tunekit.models.load.load_model loads an eval target
    return str(resolve_model_path(model)), str(dtype).replace("torch.", "")


def inner(args) -> None:
    """One path, in this process: load, then time simple_evaluate; prints one JSON line."""
    import lm_eval

    folder, dtype = _folder_and_dtype(args.model)
    if args.path == "tunekit":
        from tunekit.evaluation.harness import item_count, run_tasks, select_tasks
        from tunekit.models.trained import load_any

        model, tok = load_any(args.model)
        selection = select_tasks(args.tasks)
        t0 = time.perf_counter()
        results = run_tasks(model, tok, selection, limit=args.limit, batch_size=args.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=folder, dtype=dtype, device="cpu", batch_size=args.batch_size)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        t0 = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), limit=args.limit,
                                          task_manager=manager, log_samples=True, bootstrap_iters=1000)
        from tunekit.evaluation.harness import item_count
    seconds = time.perf_counter() - t0
    items = item_count(results)
    scores = {t: {k: v for k, v in r.items() if isinstance(v, float)} for t, r in results["results"].items()}
    print(json.dumps({"path": args.path, "items": items, "eval_s": seconds, "items_per_s": items / seconds,
                      "scores": scores}), flush=True)


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="tunekit_demo,tunekit_pref")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--path", choices=["tunekit", "lm_eval"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:
        return inner(args)
    folder, dtype = _folder_and_dtype(args.model)
    common = ["--limit", str(args.limit), "--batch-size", str(args.batch_size)]
    rows = {"tunekit": [], "lm_eval": []}
    walls = {"tunekit": [], "lm_eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for path in ("tunekit", "lm_eval"):  # alternate, so drift on a shared machine hits both
                _, out = _run([sys.executable, __file__, "--path", path, "--model", args.model, "--tasks", args.tasks,
                               *common])
                rows[path].append(json.loads(out.strip().splitlines()[-1]))
            wall, _ = _run([sys.executable, "-m", "tunekit", "eval", args.model, "--tasks", args.tasks, *common,
                            "-o", f"{tmp}/eval{r}.json"])
            walls["tunekit"].append(wall)
            wall, _ = _run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                            f"pretrained={folder},dtype={dtype}", "--device", "cpu", "--tasks", args.tasks,
                            "--include_path", str(TASKS_DIR), "--limit", str(args.limit),
                            "--batch_size", str(args.batch_size)])
            walls["lm_eval"].append(wall)
    best = {p: max(r["items_per_s"] for r in rows[p]) for p in rows}
    print(f"model {args.model} ({dtype}), tasks {args.tasks}, limit {args.limit}, batch {args.batch_size}, "
          f"best of {args.repeats}")
    print("| path | items | items/s (eval) | command wall s (min) |\n|---|---|---|---|")
    for p in rows:
        print(f"| {p} | {rows[p][0]['items']} | {best[p]:.2f} | {min(walls[p]):.1f} |")
    print(f"tunekit / lm_eval items/s: {best['tunekit'] / best['lm_eval']:.3f}")
    print("scores equal:", rows["tunekit"][0]["scores"] == rows["lm_eval"][0]["scores"])


if __name__ == "__main__":
    main()
