"""Benchmark: `tunekit merge` (streaming) vs the naive transformers path, wall time and peak RSS.

Two ~1.1 GB bf16 models are built from the public TinyLlama-1.1B config (10 of its 22 layers, ~570M params,
random weights; nothing downloaded). Each path runs in its own subprocess; peak RSS is that process's
`ru_maxrss` from `os.wait4`, wall time is measured around it.

    .venv/bin/python bench/merge.py --workdir /tmp/tunekit-bench-merge [--layers 10] [--repeat 1]

Naive path: load both models with `AutoModelForCausalLM.from_pretrained`, combine every parameter (same math,
`tunekit.merge.methods`, float32 per tensor) into the first model, `save_pretrained`.
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

# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json (public), with fewer layers.
TINYLLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "num_hidden_layers": 22,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SLERP_T = 0.5
DARE = {"weight": 0.7, "density": 0.5}


def build(folder: Path, seed: int, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**TINYLLAMA_CONFIG, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)


def run_tunekit(method: str, a: str, b: str, out: str) -> None:
    from tunekit.merge.config import validate_config
    from tunekit.merge.engine import merge_models

    if method == "slerp":
        raw = {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": SLERP_T},
            "dtype": "bfloat16",
        }
    else:
        raw = {
            "merge_method": "dare_ties",
            "base_model": a,
            "models": [{"model": a}, {"model": b, "parameters": DARE}],
            "dtype": "bfloat16",
        }
    merge_models(validate_config(raw, "bench"), out, overwrite=True, progress=False, log=lambda m: None)


def run_naive(method: str, a: str, b: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tunekit.merge.methods import (
        TensorInputs,
        generalized_task_arithmetic,
        slerp,
        sparsify_random,
        tensor_seed,
    )

    ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
    mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16)
    pb = dict(mb.named_parameters())
    with torch.no_grad():
        for name, p in ma.named_parameters():
            x, y = p.float(), pb[name].float()
            if method == "slerp":
                merged = slerp(x, y, SLERP_T)
            else:  # same per-tensor seeds as tunekit (one per row block), so the results are comparable
                parts = []
                for ci, rows in enumerate(TensorInputs(name, tuple(p.shape), [], None).chunks()):
                    r0, r1 = rows if rows else (0, p.shape[0])
                    gen = torch.Generator().manual_seed(tensor_seed(0, name, 1, ci))
                    delta = sparsify_random(y[r0:r1] - x[r0:r1], DARE["density"], True, gen)
                    parts.append(generalized_task_arithmetic(x[r0:r1], [delta], [DARE["weight"]], consensus="sum"))
                merged = torch.cat(parts)
            p.copy_(merged.to(p.dtype))
    ma.save_pretrained(out)


def measure(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python bench/merge.py --child ...` in its own process.

    The parent stays small (no torch): Linux's ru_maxrss of a child also counts the RSS it inherited at
    fork time, so a large parent would inflate every measurement.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def max_abs_diff(x: Path, y: Path) -> float:
    import torch

    from tunekit.merge.io import SafetensorsFolder

    fx, fy = SafetensorsFolder(x), SafetensorsFolder(y)
    worst = 0.0
    for n in fx.names():
        worst = max(worst, float((fx.read(n, dtype=torch.float32) - fy.read(n, dtype=torch.float32)).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/tunekit-bench-merge")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        kind, *rest = ns.child
        if kind == "build":
            build(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "diff":
            print(max_abs_diff(Path(rest[0]), Path(rest[1])))
        elif kind == "tunekit":
            run_tunekit(*rest)
        else:
            run_naive(*rest)
        return

    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    a, b = work / "model_a", work / "model_b"
    for folder, seed in ((a, 0), (b, 1)):
        if not (folder / "config.json").is_file():
            measure(["build", str(folder), str(seed), str(ns.layers)])
    size_gb = sum(f.stat().st_size for f in a.glob("*.safetensors")) / 1e9
    rows = []
    for method in ("slerp", "dare_ties"):
        results = {}
        for path in ("naive", "tunekit"):
            out = work / f"out_{path}_{method}"
            runs = []
            for _ in range(ns.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(measure([path, method, str(a), str(b), str(out)]))
            results[path] = (min(r[0] for r in runs), max(r[1] for r in runs))
        diff = float(
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "diff",
                    str(work / f"out_naive_{method}"),
                    str(work / f"out_tunekit_{method}"),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[-1]
        )
        rows.append((method, results, diff))
    print(json.dumps({"model_gb": size_gb, "rows": [[m, r, d] for m, r, d in rows]}, indent=1))
    print(
        f"\nTwo {size_gb:.2f} GB bf16 models (TinyLlama-1.1B config, {ns.layers} layers), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print("| method | path | wall time (s) | peak RSS (MiB) | RSS vs naive | time vs naive | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for method, res, diff in rows:
        nw, nr = res["naive"]
        tw, tr = res["tunekit"]
        print(f"| {method} | naive (transformers) | {nw:.1f} | {nr:.0f} | 100% | 1.00x | |")
        print(
            f"| {method} | tunekit merge | {tw:.1f} | {tr:.0f} | {100 * tr / nr:.0f}% | {tw / nw:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
