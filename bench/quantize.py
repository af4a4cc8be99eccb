"""Benchmark `tunekit quantize --verify` on the embedded default model (SmolLM2-135M-Instruct).

Each configuration runs as its own `tunekit quantize` process so export time and peak RAM are its own.
Prints a markdown table (and writes it with --markdown PATH).

    .venv/bin/python bench/quantize.py --markdown /tmp/bench-quantize.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (format, type, calibration): a calibration for a K-quant adds llama.cpp's importance matrix.
CONFIGS = [("gguf", "Q8_0", None), ("gguf", "Q4_K_M", None), ("gguf", "Q4_K_M", "builtin"), ("gptq", "W4A16", None)]


def run(source: str, fmt: str, qtype: str, out_dir: Path, samples: int, calibration: str | None = None) -> dict:
    suffix = "-imatrix" if calibration else ""
    out = out_dir / (f"model-{qtype}{suffix}.gguf" if fmt == "gguf" else f"model-{fmt}")
    cmd = [
        sys.executable,
        "-m",
        "tunekit",
        "quantize",
        source,
        "--format",
        fmt,
        "--type",
        qtype,
        "--output",
        str(out),
        "--verify",
        "--samples",
        str(samples),
        "--overwrite",
    ] + (["--calibration", calibration] if calibration else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(log[-4000:], file=sys.stderr)  # noqa: T201
        raise SystemExit(f"{' '.join(cmd)} failed")
    card_file = out / "run_card.json" if out.is_dir() else out.with_name(out.name + ".card.json")
    card = json.loads(card_file.read_text())
    card["wall_seconds"] = round(wall, 1)
    card["command"] = " ".join(["tunekit"] + cmd[3:]).replace(str(out_dir), "OUT")
    return card


def markdown(cards: list[dict]) -> str:
    rows = [
        "| format | type | PPL source | PPL quantized | Δ PPL | top-1 agreement | size MB | bits/weight "
        "| export s | peak RAM export MB | peak RAM incl. verify MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cards:
        v = c["verify"]
        rows.append(
            f"| {c['format']} | {c['type']} | {v['ppl_source']:.3f} | {v['ppl_quantized']:.3f} "
            f"| {v['ppl_change_pct']:+.2f}% | {100 * v['top1_agreement']:.2f}% "
            f"| {v['output_bytes'] / 1e6:.1f} "
            f"| {v['output_bpw']:.2f} | {c['export_seconds']:.1f} | {c['peak_rss_mb_export']:.0f} "
            f"| {c['peak_rss_mb_total']:.0f} |"
        )
    v0 = cards[0]["verify"]
    rows.append("")
    rows.append(
        f"Source: {cards[0]['model_folder']} ({v0['parameters'] / 1e6:.1f} M parameters, "
        f"{v0['source_bytes'] / 1e6:.1f} MB, {v0['source_bpw']:.2f} bits/weight); evaluation: "
        f"{v0['tokens']} tokens of {v0['eval_text']}, windows of {v0['ctx']}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU."
    )
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--only", nargs="*", help="e.g. gguf:Q8_0")
    args = ap.parse_args()
    configs = [c for c in CONFIGS if not args.only or f"{c[0]}:{c[1]}" in args.only]
    with tempfile.TemporaryDirectory(prefix="tunekit-bench-") as td:
        cards = []
        for fmt, qtype, calibration in configs:
            card = run(args.source, fmt, qtype, Path(td), args.samples, calibration)
            card["type"] += " + imatrix" if calibration else ""
            print(
                json.dumps({k: card[k] for k in ("format", "type", "export_seconds", "verify")}), flush=True
            )
            cards.append(card)
    table = markdown(cards)
    table += "\nCommands:\n\n" + "\n".join(f"    {c['command']}" for c in cards) + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
