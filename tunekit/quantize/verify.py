"""`--verify`: how much did quantization cost?

Both models score the same token ids (from the source's HF tokenizer) in windows of `ctx` tokens:
perplexity PPL = exp(−(1/N)·Σ log p(x_t | x_<t)), top-1 agreement = share of positions where both models'
most likely next token is the same, plus file size and bits per weight = 8·bytes / parameters.
The source runs in transformers; a GGUF runs in llama.cpp, a GPTQ/AWQ folder in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

LogitsFn = Callable[[list[int]], np.ndarray]


def default_eval_texts(split: str = "eval") -> list[str]:
    """Offline English text that ships with every Python: the stdlib's pydoc topic pages (Python docs).

    Topics are sorted; even-indexed ones are the calibration split, odd-indexed ones the evaluation split,
    so calibration and evaluation never overlap.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    keep = keys[1::2] if split == "eval" else keys[0::2]
    return [topics[k].strip() for k in keep if len(topics[k].strip()) > 200]


def eval_ids(tokenizer: Any, texts: list[str], max_tokens: int) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def windows(ids: list[int], ctx: int) -> Iterator[list[int]]:
    for start in range(0, len(ids) - 1, ctx):
        chunk = ids[start : start + ctx]
        if len(chunk) > 1:
            yield chunk


def hf_logits_fn(model_dir: str | Path) -> LogitsFn:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()

    def fn(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]))
        return out.logits[0].float().numpy()

    return fn


def gguf_logits_fn(path: str | Path, ctx: int) -> LogitsFn:
    from tunekit.quantize import llamacpp

    llm = llamacpp.load(path, n_ctx=ctx)

    def fn(ids: list[int]) -> np.ndarray:
        return llamacpp.logits(llm, ids)

    return fn


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return logz - z[np.arange(len(targets)), targets]


def compare(
    source: LogitsFn,
    quantized: LogitsFn,
    ids: list[int],
    ctx: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Perplexity of both models and their top-1 next-token agreement on `ids` (windows of `ctx`)."""
    nll_s = nll_q = 0.0
    agree = n = 0
    max_abs = 0.0
    chunks = list(windows(ids, ctx))
    for i, chunk in enumerate(chunks):
        ls, lq = source(chunk), quantized(chunk)
        vocab = min(ls.shape[-1], lq.shape[-1])
        ls, lq = ls[:-1, :vocab], lq[:-1, :vocab]
        targets = np.asarray(chunk[1:])
        nll_s += float(_nll(ls, targets).sum())
        nll_q += float(_nll(lq, targets).sum())
        agree += int((ls.argmax(-1) == lq.argmax(-1)).sum())
        max_abs = max(max_abs, float(np.abs(ls - lq).max()))
        n += len(targets)
        if progress is not None:
            progress(i + 1, len(chunks))
    ppl_s, ppl_q = math.exp(nll_s / n), math.exp(nll_q / n)
    return {
        "tokens": n,
        "ppl_source": ppl_s,
        "ppl_quantized": ppl_q,
        "ppl_change_pct": 100.0 * (ppl_q / ppl_s - 1.0),
        "top1_agreement": agree / n,
        "max_abs_logit_diff": max_abs,
    }


def path_size(path: str | Path) -> int:
    """Bytes on disk of a file, or of the weight files in a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")
    )


def gguf_bits_per_weight(path: str | Path) -> tuple[float, int]:
    """(bits per weight, parameters) over all tensors of a GGUF file, from its tensor table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return 8.0 * nbytes / n, n


def folder_params(path: str | Path) -> int:
    """Parameters of an unquantized safetensors folder."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                n += int(np.prod(sf.get_slice(k).get_shape()))
    return n


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    v = report["verify"]
    table = Table(title=f"tunekit quantize --verify ({report['format']} {report.get('type', '')})".strip())
    table.add_column("metric")
    table.add_column("source", justify="right")
    table.add_column("quantized", justify="right")
    table.add_row(
        "perplexity", f"{v['ppl_source']:.4f}", f"{v['ppl_quantized']:.4f} ({v['ppl_change_pct']:+.2f}%)"
    )
    table.add_row("top-1 agreement", "", f"{100 * v['top1_agreement']:.2f}%")
    table.add_row("size (MB)", f"{v['source_bytes'] / 1e6:.1f}", f"{v['output_bytes'] / 1e6:.1f}")
    table.add_row("bits / weight", f"{v['source_bpw']:.2f}", f"{v['output_bpw']:.2f}")
    table.add_row("eval tokens", str(v["tokens"]), "")
    Console(stderr=True).print(table)
