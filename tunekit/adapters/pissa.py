"""PiSSA: principal singular values and vectors adaptation (Meng, Wang & Zhang, NeurIPS 2024).

Update rule: W = U_p S_p V_p^T + W_res; train A = sqrt(S_p/s) V_p^T, B = U_p sqrt(S_p/s) (the r PRINCIPAL
components, s = alpha/r the LoRA scale), freeze W_res = W − s·B₀A₀; the model computes W_res + s·B·A.
Trainable parameters per module: r·(d_in + d_out), as LoRA.

Full-precision bases use PEFT's own initialisation (`init_lora_weights="pissa"`, or `"pissa_niter_N"` for the
fast randomized SVD when `adapter.svd_niter: N`). PEFT refuses 4-bit bases, so for QLoRA (QPiSSA in the
paper) the same rule is hand-written in `svd_lora_init`: the SVD is taken on the de-quantised weight and the
residual is re-quantised to 4-bit with the layer's own settings.

Saving converts the adapter to a plain rank-2r LoRA relative to the ORIGINAL base with PEFT's
`path_initial_model_for_weight_conversion` (ΔW = s·(B·A − B₀·A₀) = s·[B | B₀]·[A ; −A₀]), so the saved adapter
loads with vanilla PEFT on the untouched base model. On a 4-bit base this is exact only up to the
quantisation gap Q(W_res) + s·BA vs Q(W) + ΔW (the paper's note on QPiSSA).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from tunekit.adapters import AdapterKind, AttachContext, register
from tunekit.adapters import lora as L
from tunekit.adapters._svd import dense_weight, set_weight, svd
from tunekit.config.schema import REWARD_MODEL_REFUSALS, AdapterConfig
from tunekit.errors import TunekitError


def svd_lora_init(model: Any, part: str, niter: int | None = None) -> None:
    """Initialise every LoRA layer of a PEFT model from the SVD of its base weight.

    part "principal" (PiSSA): the r largest singular triplets; "minor" (MiLoRA): the r smallest.
    A = sqrt(S_r/s)·V_r^T, B = U_r·sqrt(S_r/s), base ← W − s·B·A (re-quantised when 4-bit).
    """
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        if not isinstance(layer.lora_A["default"], torch.nn.Linear):
            raise TunekitError(f"{part} initialisation supports linear layers only, not '{name}'")
        base = layer.get_base_layer()
        r = layer.r["default"]
        scale = layer.scaling["default"]
        w = dense_weight(base)
        if r > min(w.shape):
            raise TunekitError(f"adapter.r={r} exceeds min(d_out, d_in)={min(w.shape)} of '{name}'")
        u, s, vh = svd(w, niter=niter if part == "principal" else None, rank=r)
        pick = slice(0, r) if part == "principal" else slice(s.shape[0] - r, s.shape[0])
        root = torch.sqrt(s[pick] / scale)
        a = root[:, None] * vh[pick]
        b = u[:, pick] * root[None, :]
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            lora_a.data = a.to(device=lora_a.device, dtype=lora_a.dtype).contiguous()
            lora_b.data = b.to(device=lora_b.device, dtype=lora_b.dtype).contiguous()
        residual = w - scale * (lora_b.detach().to(torch.float32).cpu() @ lora_a.detach().to(torch.float32).cpu())
        set_weight(base, residual)


def remember_initial(model: Any) -> None:
    """Save the freshly initialised adapter (PEFT layout) to a temporary folder held by the model, as PEFT's
    conversion at save time needs it (`path_initial_model_for_weight_conversion`)."""
    tmp = tempfile.TemporaryDirectory(prefix="tunekit-initial-adapter-")
    folder = Path(tmp.name) / "initial"
    model.save_pretrained(str(folder), safe_serialization=True)
    model.tunekit_initial_adapter = tmp  # removed when the model is garbage-collected
    model.tunekit_initial_adapter_dir = folder


def save_converted(model: Any, cfg: AdapterConfig, out_dir: Path) -> None:
    """Write a plain PEFT LoRA (rank 2r) relative to the original base weights."""
    import warnings

    initial = getattr(model, "tunekit_initial_adapter_dir", None)
    if initial is None:
        raise TunekitError(f"adapter.method={cfg.method}: model has no initial adapter to convert against")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Quant\\(W_res\\).*")
        model.save_pretrained(
            str(out_dir), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
        )


def build_svd_lora(model: Any, cfg: AdapterConfig, ctx: AttachContext, part: str) -> Any:
    """A PEFT LoRA model whose A, B come from the SVD of each base weight (PiSSA: principal, MiLoRA: minor)."""
    use_peft_pissa = part == "principal" and not ctx.quantized and not ctx.meta
    if use_peft_pissa:
        init: Any = "pissa" if cfg.svd_niter is None else f"pissa_niter_{cfg.svd_niter}"
    else:
        init = True
    model = L.wrap(model, L.lora_config(cfg, ctx, init_lora_weights=init), ctx)
    if ctx.meta:
        return model
    if not use_peft_pissa:
        svd_lora_init(model, part, cfg.svd_niter)
    model.peft_config["default"].init_lora_weights = True  # the saved initial adapter is a plain LoRA
    remember_initial(model)
    return model


def build_pissa(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    return build_svd_lora(model, cfg, ctx, "principal")


def svd_lora_kind(name: str, build: Any, description: str) -> AdapterKind:
    """PiSSA and MiLoRA: built from an SVD, saved (converted) as a plain PEFT LoRA of rank 2r relative to the
    original base, so every operation on the saved folder is the LoRA kind's."""
    return AdapterKind(
        name,
        build,
        description,
        save=save_converted,
        saved_as="lora",
        load=L.load_lora,
        fold=L.fold_lora,
        plan_merge=L.plan_merge,
        sum_refusal=L.SUM_REFUSAL,
        export_lora=lambda folder: Path(folder),
        seq_cls_refusal=REWARD_MODEL_REFUSALS[name],
    )


KIND = register(
    svd_lora_kind("pissa", build_pissa, "PiSSA: W_res + s·B·A, A, B from the r principal singular triplets")
)
