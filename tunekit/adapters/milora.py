"""MiLoRA: minor singular component LoRA (Wang et al., NAACL 2025).

Update rule: W = W_p + U_m S_m V_m^T; train A = sqrt(S_m/s) V_m^T, B = U_m sqrt(S_m/s) (the r MINOR
components, smallest singular values; s = alpha/r), freeze W − s·B₀A₀; the model computes W_res + s·B·A.
Both A and B train (PEFT's `mica` init freezes B and zeroes A: a different method). Trainable parameters per
module: r·(d_in + d_out), as LoRA.

Hand-written on top of a PEFT LoRA model (`tunekit.adapters.pissa.svd_lora_init` with part="minor") because
PEFT has no MiLoRA initialisation; the full SVD is always used (a randomized SVD finds only the principal
components). With a 4-bit base the SVD is of the de-quantised weight and the residual is re-quantised to
4-bit. Saving converts to a plain rank-2r LoRA relative to the original base (as PiSSA).
"""

from __future__ import annotations

from typing import Any

from tunekit.adapters import AttachContext, register
from tunekit.adapters.pissa import build_svd_lora, svd_lora_kind
from tunekit.config.schema import AdapterConfig


def build_milora(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    return build_svd_lora(model, cfg, ctx, "minor")


KIND = register(svd_lora_kind("milora", build_milora, "MiLoRA: W_res + s·B·A, A, B from the r minor singular triplets"))
