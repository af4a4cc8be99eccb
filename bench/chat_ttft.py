"""Time to the first streamed token: `tunekit chat` vs a plain transformers `generate` script, on the embedded
default model (SmolLM2-135M-Instruct), CPU.

Both sides load the model once and then answer the same prompts greedily; measured per prompt is the wall time
from handing over the conversation to the first non-empty piece of text (tunekit: `TransformersBackend.stream`,
what `tunekit chat` prints; plain: `model.generate` with a `TextIteratorStreamer` in a thread, the recipe in the
transformers docs), plus the answer's tokens per second. The .gguf path (llama-cpp-python) is timed too when a
GGUF is given. Prints a markdown table (and writes it with --markdown PATH).

    .venv/bin/python bench/chat_ttft.py --markdown /tmp/bench-chat.md [--gguf RUN.gguf]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

PROMPTS = ["What is the capital of France?", "Give me one tip for writing clear code.", "What is 12 times 3?",
           "Name a fruit that is yellow.", "Write one sentence about the sea."]


def time_stream(pieces, t0: float) -> tuple[float, float, str]:
    """(seconds to the first non-empty piece, total seconds, text)."""
    first = None
    text = []
    for piece in pieces:
        if piece and first is None:
            first = time.perf_counter() - t0
        text.append(piece)
    return first if first is not None else float("nan"), time.perf_counter() - t0, "".join(text)


def plain_transformers(folder: str, max_new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()

    def answer(prompt: str):
        t0 = time.perf_counter()
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=model.generate, kwargs=dict(**ids, max_new_tokens=max_new_tokens,
                                                                     do_sample=False, streamer=streamer))
        worker.start()
        out = time_stream(streamer, t0)
        worker.join()
        return out

    return answer


def tunekit_backend(target: str, max_new_tokens: int):
    from tunekit.chat.backends import GenParams, load_backend

    backend = load_backend(target)
    params = GenParams(temperature=0, max_new_tokens=max_new_tokens)

    def answer(prompt: str):
        t0 = time.perf_counter()
        return time_stream(backend.stream([{"role": "user", "content": prompt}], params, threading.Event()), t0)

    return answer


def measure(name: str, make, repeats: int) -> dict:
    t0 = time.perf_counter()
    answer = make()
    load = time.perf_counter() - t0
    answer(PROMPTS[0])  # warm-up (first-call allocations), not counted
    ttft, total, chars = [], [], 0
    for _ in range(repeats):
        for p in PROMPTS:
            first, whole, text = answer(p)
            ttft.append(first)
            total.append(whole)
            chars += len(text)
    return {"name": name, "load_s": load, "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft),
            "answer_median_s": statistics.median(total), "chars": chars}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias or model folder (default: the embedded model)")
    ap.add_argument("--gguf", default=None, help="also time `tunekit chat FILE.gguf` (llama-cpp-python)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    from tunekit.models.load import resolve_model_path

    folder = str(resolve_model_path(args.model))
    rows = [measure("plain transformers generate + TextIteratorStreamer",
                    lambda: plain_transformers(folder, args.max_new_tokens), args.repeats),
            measure(f"tunekit chat {args.model}", lambda: tunekit_backend(args.model, args.max_new_tokens),
                    args.repeats)]
    if args.gguf:
        rows.append(measure(f"tunekit chat {os.path.basename(args.gguf)}",
                            lambda: tunekit_backend(args.gguf, args.max_new_tokens), args.repeats))
    lines = [f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"{len(PROMPTS)} prompts x {args.repeats}, greedy, max {args.max_new_tokens} new tokens", "",
             "| path | load (s) | first token median (s) | first token max (s) | answer median (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['load_s']:.1f} | {r['ttft_median_s']:.3f} | {r['ttft_max_s']:.3f} | "
              f"{r['answer_median_s']:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
