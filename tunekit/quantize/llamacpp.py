"""llama.cpp through llama-cpp-python (the `llama` extra): K-quant / IQ quantization, importance matrices,
and running a GGUF (logits, perplexity) for tests and `--verify`.

Quantization calls llama.cpp's own `llama_model_quantize` on an F32/F16 GGUF we wrote with gguf-py. The
importance matrix is computed here (llama.cpp's `llama-imatrix` tool is not in the wheel): for every
linear layer the mean of squared inputs per input column, E[x_j²] over calibration tokens, which is what
llama.cpp's quantizer weighs each column's rounding error by. It is handed over in memory as
`llama_model_imatrix_data` entries keyed by GGUF tensor name.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tunekit.errors import TunekitError

INSTALL_HINT = (
    "install llama-cpp-python: `pip install 'tunekit[llama]'` "
    "(or `make install-llama`; it compiles llama.cpp, ~8 min on 2 cores)"
)

# --type name → llama_ftype constant in llama_cpp (K-quants and IQ types: llama.cpp's quantizer only).
LLAMA_TYPES = {
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q2_K_S": "LLAMA_FTYPE_MOSTLY_Q2_K_S",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "IQ1_S": "LLAMA_FTYPE_MOSTLY_IQ1_S",
    "IQ1_M": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "IQ2_XXS": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "IQ2_XS": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "IQ2_S": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "IQ2_M": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "IQ3_XXS": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "IQ3_XS": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
    "IQ3_S": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "IQ3_M": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in llama-quant.cpp).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
# IQ types and low-bit K-quants gain most from one; we use calibration data whenever it is given.
WANTS_IMATRIX = NEEDS_IMATRIX | {
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "IQ3_XS",
    "IQ3_S",
    "IQ3_M",
    "IQ4_NL",
    "IQ4_XS",
}


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise TunekitError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from None
    return llama_cpp


def compute_imatrix(
    model_folder: str | Path, texts: list[str], max_length: int = 512
) -> dict[str, np.ndarray]:
    """Importance matrix from calibration text: for each linear layer, E[x_j²] per input column j
    (as llama.cpp's imatrix tool: sum of squared activations divided by the token count), keyed by the
    GGUF name of its weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.quantize.gguf_writer import hf_to_gguf_names

    names = hf_to_gguf_names(Path(model_folder))
    tok = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        gname = names.get(f"{mod_name}.weight")
        if not isinstance(mod, torch.nn.Linear) or gname is None:
            continue

        def hook(_m: Any, inputs: tuple, _out: Any, gname: str = gname) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
            counts[gname] = counts.get(gname, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                if ids.shape[1] > 0:
                    model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise TunekitError("calibration produced no activations (empty calibration texts?)")
    return {k: (v / counts[k]).float().numpy() for k, v in sums.items()}


def llama_quantize(
    src: str | Path,
    dst: str | Path,
    qtype: str,
    imatrix: dict[str, np.ndarray] | None = None,
    nthread: int | None = None,
    embedding_type: str | None = None,
) -> None:
    """Quantize GGUF `src` (F32/F16/BF16) to `dst` with llama.cpp's `llama_model_quantize`; `embedding_type`
    sets the token-embedding and output tensor types (llama-quantize's --token-embedding-type)."""
    llama_cpp = require_llama_cpp()
    qtype = qtype.upper()
    if qtype not in LLAMA_TYPES:
        raise TunekitError(f"unknown llama.cpp quant type {qtype!r}; known: {', '.join(LLAMA_TYPES)}")
    if qtype in NEEDS_IMATRIX and not imatrix:
        raise TunekitError(f"--type {qtype} needs an importance matrix: pass --calibration DATASET")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    if embedding_type is not None:
        import gguf

        ggml = int(gguf.GGMLQuantizationType[embedding_type.upper()])
        params.token_embedding_type = ggml
        params.output_tensor_type = ggml
    keep: list[Any] = []  # keep ctypes buffers alive during the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise TunekitError(f"llama.cpp could not quantize '{src}' to {qtype} (return code {rc})")


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Send llama.cpp's log (the loader's key/value dump, one line per tensor) to the file `path` instead of the
    terminal while the block runs; llama-cpp-python's own callback is put back afterwards."""
    llama_cpp = require_llama_cpp()
    from llama_cpp import _logger

    with open(path, "a", encoding="utf-8") as f:

        @llama_cpp.llama_log_callback
        def write(_level: int, text: bytes, _user_data: Any) -> None:
            f.write(text.decode("utf-8", errors="replace"))

        llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# llama-quant.cpp's fallback lines: older "tensor cols 64 x 64 are not divisible by 256, required for q4_K - using
# fallback quantization q5_0"; llama-cpp-python 0.3.36's "ncols 64 not divisible by 256 (required for type q4_K) ->
# falling back to q5_0". Groups: block width, wanted type, fallback type.
_FALLBACK = (
    re.compile(r"not divisible by (\d+), required for (\w+)\s*-\s*using fallback quantization (\w+)"),
    re.compile(r"not divisible by (\d+) \(required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)"),
)


def fallback_summary(log: str) -> list[str]:
    """One line per (wanted type, fallback type) from llama.cpp's quantize log, e.g. "180 tensors fell back to
    Q5_0 (wanted Q4_K): row width not a multiple of 256"."""
    counts = Counter(found for pattern in _FALLBACK for found in pattern.findall(log))
    return [f"{n} tensor{'s' if n != 1 else ''} fell back to {to.upper()} (wanted {want.upper()}): row width not "
            f"a multiple of {block}" for (block, want, to), n in sorted(counts.items(), key=lambda kv: -kv[1])]


def load(
    path: str | Path, n_ctx: int = 512, vocab_only: bool = False, logits_all: bool = True, kv_f32: bool = True
) -> Any:
    """Open a GGUF with llama.cpp (CPU). `kv_f32` keeps the KV cache in F32 (llama.cpp's default is F16,
    which alone moves logits by ~1e-3) so measured differences come from the weights."""
    llama_cpp = require_llama_cpp()
    _quiet_logs(llama_cpp)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(
        **kv,
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=logits_all,
        vocab_only=vocab_only,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )


_LOG_CALLBACK: Any = None


def _quiet_logs(llama_cpp: Any) -> None:
    """Route llama.cpp's own log through one callback that prints errors only; all of it with TUNEKIT_DEBUG."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import sys

    debug = os.environ.get("TUNEKIT_DEBUG", "") not in ("", "0", "false")
    state = {"shown": False}

    def log(level: int, text: bytes, _user: Any) -> None:
        # 3 = error, 5 = continuation. The context-overflow "error" is noise: a vocab-only load has no training
        # context, and chat caps the context at the training one.
        shown = debug or (level == 3 and b"training context overflow" not in text) or (level == 5 and state["shown"])
        state["shown"] = shown
        if shown:
            print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

    _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's tokenization of `text`, special tokens parsed, no BOS added."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of one sequence (len(ids) <= n_ctx), from a fresh KV cache."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
