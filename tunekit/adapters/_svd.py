"""Shared by the SVD-based adapters (PiSSA, MiLoRA, LoRA-XS, SVFT): dense weights of plain or 4-bit layers,
the SVD with canonical signs, 4-bit re-quantisation of residuals, target resolution and base fingerprints.

Written once here so the four methods agree bit for bit on what "the SVD of W" is:
  * W is the layer's weight as float32 (out × in); a bitsandbytes 4-bit weight is de-quantised first
    (QPiSSA, Meng et al. 2024: the SVD is taken on the de-quantised weights, the residual is re-quantised).
  * W = U S V^T with S descending; each singular pair is sign-normalised so that the largest-magnitude entry
    of u_i is positive (v_i flips with it, so u_i s_i v_i^T is unchanged). This makes the factors a function
    of W alone, so SVFT can recompute them at load time and get the same U, V.
  * A fingerprint is sha256 over shape + float32 bytes of W, per module; the adapter's fingerprint is sha256
    over the sorted (name, module fingerprint) pairs.
`own_format_kind` is the registration LoRA-XS and SVFT share (their own saved format, fingerprinted).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.adapters import AdapterKind, fold_with_plan
from tunekit.config.schema import REWARD_MODEL_REFUSALS
from tunekit.errors import TunekitError


def is_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None and hasattr(
        module.weight, "quant_type"
    )


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt (both subclass nn.Linear)."""
    return isinstance(module, nn.Linear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, also for packed 4-bit weights and the meta device."""
    return int(module.out_features), int(module.in_features)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 (d_out, d_in) tensor (4-bit and 8-bit bitsandbytes de-quantised)."""
    weight = module.weight
    if is_4bit(module):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if getattr(weight, "SCB", None) is not None or weight.dtype == torch.int8:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).to(torch.float32)
    return weight.detach().to(torch.float32)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in (the bnb compute dtype for 4-bit layers)."""
    if is_4bit(module):
        return getattr(module, "compute_dtype", None) or module.weight.quant_state.dtype
    return module.weight.dtype


def quant_info(module: nn.Module) -> dict[str, Any] | None:
    """How a 4-bit weight was quantised (enough to reproduce it from the 16-bit weight), else None."""
    if not is_4bit(module):
        return None
    w = module.weight
    return {
        "quant_type": w.quant_type,
        "blocksize": int(w.blocksize),
        "compress_statistics": bool(w.compress_statistics),
        "quant_storage": str(w.quant_storage).removeprefix("torch."),
        "dtype": str(w.quant_state.dtype).removeprefix("torch."),
    }


def quantize_roundtrip(w: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """What a 16-bit weight becomes after loading it in 4-bit with `info` (bitsandbytes), as float32."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    dtype = getattr(torch, info["dtype"])
    packed, state = quantize_4bit(
        w.to(dtype).contiguous(),
        blocksize=info["blocksize"],
        compress_statistics=info["compress_statistics"],
        quant_type=info["quant_type"],
        quant_storage=getattr(torch, info["quant_storage"]),
    )
    return dequantize_4bit(packed, state).to(torch.float32)


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Replace the layer's (frozen) weight by `w` (float32, d_out × d_in); a 4-bit layer is re-quantised
    with its own settings (the frozen residual stays 4-bit, as QPiSSA)."""
    old = module.weight
    if is_4bit(module):
        import bitsandbytes as bnb

        new = bnb.nn.Params4bit(
            data=w.to(old.quant_state.dtype).cpu().contiguous(),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
        )
        module.weight = new.to(old.device)
        return
    if old.dtype == torch.int8:
        raise TunekitError("SVD-based adapters need a 16/32-bit or 4-bit base (8-bit weights cannot be edited)")
    with torch.no_grad():
        old.data = w.to(device=old.device, dtype=old.dtype).contiguous()


def svd(w: torch.Tensor, niter: int | None = None, rank: int | None = None):
    """(U, S, Vh) of a float32 matrix with S descending and canonical signs.

    niter None: exact `torch.linalg.svd` (all min(d_out, d_in) components). niter given: `torch.svd_lowrank`
    (Halko et al.) for the top `rank` components only, as PEFT's `pissa_niter_N`.
    """
    w = w.to(torch.float32)
    # Small CPU SVDs run ~10x faster single-threaded on busy machines (LAPACK thread spin-up dominates).
    threads = torch.get_num_threads()
    single = w.device.type == "cpu" and min(w.shape) <= 2048 and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        else:
            if rank is None:
                raise ValueError("fast SVD needs a rank")
            u, s, v = torch.svd_lowrank(w, q=min(rank, *w.shape), niter=niter)
            vh = v.T
    finally:
        if single:
            torch.set_num_threads(threads)
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, s, vh * signs[:, None]


def fingerprint_tensor(w: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) over shape and float32 bytes."""
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def combine_fingerprints(per_module: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(per_module):
        h.update(f"{name}={per_module[name]};".encode())
    return h.hexdigest()[:16]


def target_modules(model: nn.Module, targets: str | list[str]) -> list[tuple[str, nn.Module]]:
    """The linear layers an adapter wraps: `all-linear` = every linear layer except the output embedding;
    a list = modules whose name ends with one of the entries; another string = a regex over full names
    (PEFT's rules)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not is_linear(module) or module is out_emb:
            continue
        if isinstance(targets, str):
            ok = targets == "all-linear" or re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok:
            found.append((name, module))
    if not found:
        raise TunekitError(f"adapter.targets: no linear layer matches {targets!r}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


def allow_quantized_training(model: nn.Module) -> None:
    """transformers' Trainer refuses a 4/8-bit model unless it is a PeftModel (or QAT-trainable). Our own
    adapter modules (LoRA-XS, SVFT) train full-precision tensors on top of the frozen quantized base, exactly
    the QLoRA situation, so mark this model's quantizer instance as trainable (its class is unchanged for
    everything else)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "is_qat_trainable", False):
        return
    cls = type(quantizer)
    quantizer.__class__ = type(cls.__name__, (cls,), {"is_qat_trainable": property(lambda self: True)})


def check_no_extras(cfg: Any, ctx: Any, method: str) -> None:
    """LoRA-XS and SVFT wrap linear layers only; say so instead of ignoring embedding training requests."""
    if cfg.modules_to_save:
        raise TunekitError(f"adapter.modules_to_save is not supported with adapter.method={method} (yet)")
    if ctx.new_token_ids:
        raise TunekitError(
            f"adapter.method={method}: the chat template added {len(ctx.new_token_ids)} new token(s) whose "
            "embeddings would need training; use a model with a chat template (or model.chat_template made of "
            "existing tokens), or method lora/dora/pissa/milora"
        )


def weight_as_trained(module: nn.Module, quant: dict[str, Any] | None, where: str) -> torch.Tensor:
    """The float32 weight an adapter's SVD was taken of, recovered from a loaded base layer: a 16-bit base
    for an adapter trained on 4-bit weights is quantised the same way first (bitsandbytes is deterministic)."""
    if quant is None:
        if is_4bit(module):
            raise TunekitError(
                f"{where}: the adapter was trained on a 16/32-bit base but the base is loaded in 4-bit; "
                "load it without model.load_in_4bit"
            )
        return dense_weight(module)
    if is_4bit(module):
        return dense_weight(module)
    return quantize_roundtrip(dense_weight(module), quant)


def check_fingerprint(name: str, w: torch.Tensor, expected: str, where: str) -> None:
    """Refuse a base whose weight differs from the one the adapter was trained on."""
    got = fingerprint_tensor(w)
    if got != expected:
        raise TunekitError(
            f"{where}: base weight '{name}' has fingerprint {got}, the adapter was trained on {expected}: "
            "a different base model (or dtype/quantization); load the base the adapter was trained on"
        )


def fingerprinted_edits(
    modules: Any, base: Any, quant: dict[str, Any] | None, where: str
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """`tunekit merge` edits for the SVD-based adapters: for each (module, expected fingerprint, merge) in
    `modules`, W ↦ merge(W, seen) once `seen` — W as float32, or its 4-bit round trip for an adapter trained on a
    4-bit base — has the fingerprint saved with the adapter."""
    edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name, expected, merge in modules:
        wname = f"{name}.weight"
        if wname not in base:
            raise TunekitError(f"{where}: base has no tensor '{wname}'")

        def edit(w: torch.Tensor, name: str = name, expected: str = expected, merge: Callable = merge) -> torch.Tensor:
            seen = quantize_roundtrip(w, quant) if quant is not None else w.to(torch.float32)
            check_fingerprint(name, seen, expected, where)
            return merge(w, seen)

        edits[wname] = edit
    return edits


def read_json(file: Any) -> dict[str, Any]:
    import json

    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise TunekitError(f"{file}: cannot read adapter config ({exc})") from None


def write_json(file: Any, data: dict[str, Any]) -> None:
    import json

    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def base_name_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def own_format_kind(name: str, build: Callable[..., Any], description: str, *, config_file: str, weights_file: str,
                    plan_merge: Callable[..., Any], summable: Callable[[str], bool], **more: Any) -> AdapterKind:
    """LoRA-XS and SVFT: an adapter kind saved in its own format (its config file with the base's fingerprints,
    its weights file): detected by that config file, folded in memory with the same plan `tunekit merge`
    streams, summable, and unable to train a reward model (the format has no place for the `score` head)."""
    return AdapterKind(
        name,
        build,
        description,
        detect=lambda folder: (Path(folder) / config_file).is_file(),
        fold=lambda model, folder: fold_with_plan(model, folder, plan_merge),
        plan_merge=plan_merge,
        summable=summable,
        seq_cls_refusal=REWARD_MODEL_REFUSALS[name],
        config_file=config_file,
        weights_file=weights_file,
        ignore_config_keys=("base_model_name_or_path", "inference_mode", "peft_version", "revision"),
        **more,
    )
