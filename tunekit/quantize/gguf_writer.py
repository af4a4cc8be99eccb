"""Hugging Face safetensors folder → GGUF, written with gguf-py, one tensor at a time.

gguf-py provides the file writer, tensor names (`TensorNameMap`), metadata keys and the numpy quantizers
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). Written here: the architecture table, the metadata we
derive from `config.json`, the per-tensor transforms llama.cpp expects (Q/K row permutation for the
`llama` graph, `1 + w` RMSNorm weights for Gemma, Llama 3 RoPE frequency factors) and the streaming
loop: tensor infos are declared first, then each tensor is read from safetensors, transformed,
quantized and appended, so peak RAM stays near one tensor plus the writer's buffer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunekit.errors import TunekitError

# Types gguf-py can write itself (numpy). K-quants / IQ go through llama.cpp (tunekit.quantize.llamacpp).
DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # HF rotate-half layout → llama.cpp's interleaved RoPE for the `llama` graph
    norm_plus_one: bool = False  # Gemma RMSNorm computes x * (1 + w); llama.cpp multiplies by w
    norm_suffixes: tuple[str, ...] = ("norm.weight",)


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LLAMA", permute_qk=True),
    "MistralForCausalLM": ArchSpec("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec("QWEN2"),
    "Qwen3ForCausalLM": ArchSpec("QWEN3"),
    "Gemma2ForCausalLM": ArchSpec("GEMMA2", norm_plus_one=True),
    "Gemma3ForCausalLM": ArchSpec("GEMMA3", norm_plus_one=True),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_spec(config: dict[str, Any], source: str) -> tuple[str, ArchSpec]:
    archs = config.get("architectures") or []
    for name in archs:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise TunekitError(
        f"{source}: architecture {archs or config.get('model_type')} is not supported for GGUF; "
        f"supported: {', '.join(supported_architectures())}"
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows per head from HF's half-split RoPE pairs (i, i+d/2) to adjacent pairs (2i, 2i+1).

    Row r = h*d + s*(d/2) + i (s∈{0,1}) moves to h*d + 2i + s; shape is kept.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 RoPE scaling (Meta, Llama 3 Herd of Models, 2024, §3.3):
    1 for wavelengths < L/high, `factor` for > L/low, smooth interpolation between."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for k in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (k / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_params(cfg: dict[str, Any], kind: str = "full_attention") -> dict[str, Any]:
    """transformers ≥5 keeps RoPE in `rope_parameters` (per attention kind for Gemma 3); older: rope_theta."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if kind in rp or "full_attention" in rp:
        rp = rp.get(kind) or {}
    rp = dict(rp)
    if "rope_theta" not in rp and "rope_theta" in cfg and kind == "full_attention":
        rp["rope_theta"] = cfg["rope_theta"]
    return rp


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _add_metadata(w: Any, cfg: dict[str, Any], spec: ArchSpec) -> list[tuple[str, np.ndarray]]:
    """Hyper-parameters → GGUF keys; returns extra generated tensors (e.g. rope_freqs)."""
    import gguf

    extra: list[tuple[str, np.ndarray]] = []
    n_layer = int(cfg["num_hidden_layers"])
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    hd = _head_dim(cfg)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_vocab_size(int(cfg["vocab_size"]))
    if spec.gguf_arch == "LLAMA":
        w.add_rope_dimension_count(hd)

    rope = _rope_params(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rtype = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rtype == "llama3":
        extra.append(
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, hd))
        )
    elif rtype != "default":
        raise TunekitError(
            f"config.json: rope type {rtype!r} is not supported for GGUF (default, linear, yarn, llama3)"
        )

    if spec.gguf_arch in ("GEMMA2", "GEMMA3"):
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        layer_types = cfg.get("layer_types")
        if cfg.get("sliding_window") and layer_types:
            w.add_sliding_window(int(cfg["sliding_window"]))
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = _rope_params(cfg, "sliding_attention")
            if "rope_theta" in local:
                w.add_rope_freq_base_swa(float(local["rope_theta"]))
    return extra


def _safetensors_index(folder: Path) -> list[tuple[str, Path]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TunekitError(f"{folder}: no *.safetensors files (GGUF export reads safetensors)")
    from safetensors import safe_open

    out: list[tuple[str, Path]] = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.extend((k, f) for k in sf.keys())
    return out


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None  # None: generated tensor
    file: Path | None
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    data: np.ndarray | None = None  # generated tensors only


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str, embedding_type: str | None = None) -> Any:
    """GGML type of one tensor for file type `out_type`: 1-D tensors stay F32; for 4/5-bit types the
    embedding and output matrices use Q8_0 (llama.cpp keeps them at higher precision too), or
    `embedding_type` when given (as llama-quantize's --token-embedding-type/--output-tensor-type); rows whose
    length is not a multiple of the block size fall back to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or out_type == "F32":
        return Q.F32
    qtype = Q[out_type]
    is_embedding = gguf_name.split(".")[0] in ("token_embd", "output")
    if out_type in ("Q4_0", "Q4_1", "Q5_0", "Q5_1") and is_embedding:
        qtype = Q.Q8_0
    if embedding_type is not None and is_embedding:
        qtype = Q[embedding_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def _encode(arr: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def hf_to_gguf_names(folder: Path) -> dict[str, str]:
    """HF tensor name → GGUF tensor name for the model in `folder` (used for the importance matrix)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    _, spec = arch_spec(cfg, str(folder))
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch], int(cfg["num_hidden_layers"]))
    out = {}
    for name, _ in _safetensors_index(Path(folder)):
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[name] = mapped
    return out


def _plan(
    folder: Path, cfg: dict[str, Any], spec: ArchSpec, out_type: str, embedding_type: str | None = None
) -> list[_Planned]:
    import gguf
    from safetensors import safe_open

    n_layer = int(cfg["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch], n_layer)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = bool(cfg.get("tie_word_embeddings", False))
    plans: list[_Planned] = []
    seen: set[str] = set()
    for name, f in _safetensors_index(folder):
        if name.endswith((".rotary_emb.inv_freq", "position_ids")):
            continue
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise TunekitError(f"{folder}: tensor '{name}' has no GGUF name for {spec.gguf_arch.lower()}")
        if mapped in seen:
            raise TunekitError(f"{folder}: two tensors map to GGUF name '{mapped}'")
        seen.add(mapped)
        with safe_open(str(f), framework="pt") as sf:
            shape = tuple(sf.get_slice(name).get_shape())
        transform = None
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = lambda a: permute_qk(a, n_head)  # noqa: E731
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = lambda a: permute_qk(a, n_kv)  # noqa: E731
        elif spec.norm_plus_one and name.endswith(spec.norm_suffixes):
            transform = lambda a: a + 1.0  # noqa: E731
        plans.append(_Planned(mapped, name, f, shape, tensor_type(mapped, shape, out_type, embedding_type), transform))
    return plans


def write_gguf(
    folder: str | Path,
    output: str | Path,
    out_type: str = "F16",
    *,
    embedding_type: str | None = None,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert the HF model in `folder` to a GGUF file of type `out_type` (one of DIRECT_TYPES).

    Returns a summary (architecture, tokenizer, tensor count, bytes). `progress(done, total)` is called
    after each tensor.
    """
    import gguf
    from safetensors import safe_open

    from tunekit.quantize.gguf_vocab import add_vocab

    folder, output = Path(folder), Path(output)
    out_type = out_type.upper()
    if out_type not in DIRECT_TYPES:
        raise TunekitError(
            f"GGUF type {out_type!r} is not written directly; direct types: {', '.join(DIRECT_TYPES)}"
        )
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise TunekitError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    cfg = json.loads(cfg_path.read_text())
    hf_arch, spec = arch_spec(cfg, str(cfg_path))
    arch_name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[spec.gguf_arch]]

    w = gguf.GGUFWriter(output, arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or folder.name)
    extra = _add_metadata(w, cfg, spec)
    ftype = gguf.LlamaFileType.ALL_F32 if out_type == "F32" else gguf.LlamaFileType[f"MOSTLY_{out_type}"]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_vocab(w, folder, int(cfg["vocab_size"]))

    if embedding_type is not None:
        embedding_type = embedding_type.upper()
        if embedding_type not in DIRECT_TYPES:
            raise TunekitError(f"--embedding-type {embedding_type!r}: expected one of {', '.join(DIRECT_TYPES)}")
    plans = _plan(folder, cfg, spec, out_type, embedding_type)
    for gname, data in extra:
        plans.append(_Planned(gname, None, None, data.shape, gguf.GGMLQuantizationType.F32, data=data))
    for p in plans:
        qt = p.qtype
        w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _nbytes(p.shape, qt), raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total_bytes = 0
    for i, p in enumerate(plans):
        if p.data is not None:
            arr = p.data
        else:
            with safe_open(str(p.file), framework="pt") as sf:
                arr = sf.get_tensor(p.hf_name).float().numpy()
        if p.transform is not None:
            arr = p.transform(arr)
        enc = _encode(arr, p.qtype)
        w.write_tensor_data(enc)
        total_bytes += enc.nbytes
        del arr, enc
        if progress is not None:
            progress(i + 1, len(plans))
    w.close()
    n_params = sum(int(np.prod(p.shape)) for p in plans if p.hf_name is not None)
    return {
        "architecture": hf_arch,
        "gguf_arch": arch_name,
        "type": out_type,
        "tensors": len(plans),
        "parameters": n_params,
        "tensor_bytes": total_bytes,
        "tokenizer": vocab,
    }


def iter_gguf_tensor_types(path: str | Path) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, ggml type, shape) of each tensor in a GGUF file (via gguf-py's reader)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        yield t.name, t.tensor_type.name, tuple(int(x) for x in t.shape)
