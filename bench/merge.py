"""Benchmark: `tunekit merge` vs mergekit (`mergekit-yaml`) and vs the naive transformers path; flat memory.

Models are built from the public TinyLlama-1.1B config (fewer layers, random bf16 weights; nothing downloaded).
Each run is its own process; peak RSS is that process's `ru_maxrss` from `os.wait4`, wall time is measured
around it.

    .venv/bin/python bench/merge.py --workdir /tmp/tunekit-bench-merge [--layers 6] [--repeat 1] \
        [--mergekit-venv /tmp/tunekit-bench-mergekit] [--flat 6,14,30] [--skip-naive]

* side by side: the same YAML config (slerp, dare_ties, della, passthrough) run by `python -m tunekit merge` and
  by `mergekit-yaml` (mergekit 0.1.5, installed by this script into a throw-away venv, not by tunekit), with the
  max abs difference of the outputs for the deterministic methods;
* naive: load both models with `AutoModelForCausalLM.from_pretrained`, combine every parameter with the same
  functions, `save_pretrained` (slerp, dare_ties);
* flat memory: tunekit slerp on model pairs of growing size (`--flat` layer counts; the bigger pairs are made
  by stacking the base pair's layers with a tunekit passthrough merge), same peak RSS.
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
DELLA = {"weight": 0.7, "density": 0.5, "epsilon": 0.1}
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"


def config(method: str, a: str, b: str, layers: int) -> dict:
    """The mergekit YAML both tools run."""
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": SLERP_T},
            "dtype": "bfloat16",
        }
    if method in ("dare_ties", "della"):
        return {
            "merge_method": method,
            "base_model": a,
            "models": [{"model": a}, {"model": b, "parameters": DARE if method == "dare_ties" else DELLA}],
            "dtype": "bfloat16",
        }
    half = layers // 2
    return {  # a frankenmerge: A's first half + 2, then B's second half + 2 (overlapping layers, deeper model)
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, min(layers, half + 2)]}]},
            {"sources": [{"model": b, "layer_range": [max(0, half - 2), layers]}]},
        ],
    }


def mergekit_yaml(venv: Path) -> Path:
    """`mergekit-yaml` of a throw-away venv (made on first use: torch CPU wheel, then mergekit 0.1.5)."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        constraint = venv / "torch-constraint.txt"
        constraint.write_text(TORCH + "\n")
        subprocess.run([*pip, "-c", str(constraint), MERGEKIT], check=True)
    return exe


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


def measure(args: list[str], command: list[str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python bench/merge.py --child ...` (or `command`) in its own process.

    The parent stays small (no torch): Linux's ru_maxrss of a child also counts the RSS it inherited at
    fork time, so a large parent would inflate every measurement.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command or [sys.executable, __file__, "--child", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {command or args} failed")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def _size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def _pair(work: Path, layers: int, stack_from: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """Models A and B with `layers` layers: built with transformers, or (`stack_from`) by stacking the layers
    of a smaller pair with a tunekit passthrough merge, which is much faster and has the same tensor shapes."""
    import yaml

    a, b = work / f"model_a_{layers}", work / f"model_b_{layers}"
    for k, (folder, seed) in enumerate(((a, 0), (b, 1))):
        if (folder / "config.json").is_file():
            continue
        if stack_from is None:
            measure(["build", str(folder), str(seed), str(layers)])
            continue
        src = stack_from[k]
        n_src = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        slices, left = [], layers
        while left > 0:
            slices.append({"sources": [{"model": str(src), "layer_range": [0, min(n_src, left)]}]})
            left -= min(n_src, left)
        cfg = work / f"stack_{folder.name}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": slices}))
        subprocess.run([sys.executable, "-m", "tunekit", "merge", str(cfg), str(folder), "--no-progress"], check=True)
    return a, b


def _diff(x: Path, y: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "diff", str(x), str(y)], check=True, capture_output=True, text=True
    )
    return float(out.stdout.split()[-1])


def max_abs_diff(x: Path, y: Path) -> float:
    import torch

    from tunekit.merge.io import SafetensorsFolder

    fx, fy = SafetensorsFolder(x), SafetensorsFolder(y)
    worst = 0.0
    for n in fx.names():
        worst = max(worst, float((fx.read(n, dtype=torch.float32) - fy.read(n, dtype=torch.float32)).abs().max()))
    return worst


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/tunekit-bench-merge")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mergekit-venv", default="/tmp/tunekit-bench-mergekit")
    ap.add_argument("--methods", default="slerp,dare_ties,della,passthrough")
    ap.add_argument("--flat", default="6,14,30", help="layer counts for the flat-memory runs ('' to skip)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        kind, *rest = ns.child
        if kind == "build":
            build(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "diff":
            print(max_abs_diff(Path(rest[0]), Path(rest[1])))
        else:
            run_naive(*rest)
        return

    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    mk = mergekit_yaml(Path(ns.mergekit_venv))
    a, b = _pair(work, ns.layers)
    size_gb = _size_gb(a)
    env_note = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    rows = []

    def best(cmd_for, out: Path) -> tuple[float, float]:
        runs = []
        for _ in range(ns.repeat):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(measure([], cmd_for(out)))
        return min(r[0] for r in runs), max(r[1] for r in runs)

    for method in [m for m in ns.methods.split(",") if m]:
        cfg_file = work / f"{method}.yml"
        cfg_file.write_text(yaml.safe_dump(config(method, str(a), str(b), ns.layers), sort_keys=False))
        out_mk, out_tk = work / f"out_mergekit_{method}", work / f"out_tunekit_{method}"
        mk_cmd = [str(mk), str(cfg_file)]
        mk_res = best(lambda out, c=mk_cmd: [*c, str(out), "--no-copy-tokenizer", "--quiet"], out_mk)
        tk_cmd = [sys.executable, "-m", "tunekit", "merge", str(cfg_file)]
        tk_res = best(lambda out, c=tk_cmd: [*c, str(out), "--no-progress"], out_tk)
        diff = _diff(out_mk, out_tk) if method in ("slerp", "passthrough") else None
        rows.append({"method": method, "mergekit": mk_res, "tunekit": tk_res, "max_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)

    naive = []
    if not ns.skip_naive:
        for method in ("slerp", "dare_ties"):
            out = work / f"out_naive_{method}"
            res = best(lambda o, m=method: [sys.executable, __file__, "--child", "naive", m, str(a), str(b), str(o)],
                       out)
            naive.append({"method": method, "naive": res})
            print(json.dumps(naive[-1]), flush=True)

    flat = []
    for layers in [int(x) for x in ns.flat.split(",") if x]:
        fa, fb = _pair(work, layers, stack_from=(a, b) if layers > ns.layers else None)
        cfg_file = work / f"flat_{layers}.yml"
        cfg_file.write_text(yaml.safe_dump(config("slerp", str(fa), str(fb), layers), sort_keys=False))
        out = work / f"out_flat_{layers}"
        tk_cmd = [sys.executable, "-m", "tunekit", "merge", str(cfg_file)]
        res = best(lambda o, c=tk_cmd: [*c, str(o), "--no-progress"], out)
        flat.append({"layers": layers, "input_gb": 2 * _size_gb(fa), "tunekit": res})
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(flat[-1]), flush=True)

    print(f"\nTwo {size_gb:.2f} GB bf16 models (TinyLlama-1.1B config, {ns.layers} layers), {env_note}\n")
    print("| method | mergekit time (s) | mergekit peak RSS (MiB) | tunekit time (s) | tunekit peak RSS (MiB) "
          "| time vs mergekit | RSS vs mergekit | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        (mw, mr), (tw, tr) = r["mergekit"], r["tunekit"]
        d = "random masks" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"| {r['method']} | {mw:.1f} | {mr:.0f} | {tw:.1f} | {tr:.0f} | {tw / mw:.2f}x | {tr / mr:.2f}x | {d} |")
    if naive:
        print("\n| method | naive transformers time (s) | naive peak RSS (MiB) |\n|---|---|---|")
        for r in naive:
            print(f"| {r['method']} | {r['naive'][0]:.1f} | {r['naive'][1]:.0f} |")
    if flat:
        print("\n| layers | input size (both models, GB) | tunekit slerp time (s) | peak RSS (MiB) |")
        print("|---|---|---|---|")
        for r in flat:
            print(f"| {r['layers']} | {r['input_gb']:.2f} | {r['tunekit'][0]:.1f} | {r['tunekit'][1]:.0f} |")


if __name__ == "__main__":
    main()
