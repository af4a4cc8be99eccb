"""LoRA-XS: low-rank adaptation with extremely small number of parameters (Bałazy et al., 2024,
arXiv:2405.17604).

Update rule: W' = W + s·(U_r S_r) R V_r^T, with B = U_r S_r (d_out × r) and A = V_r^T (r × d_in) frozen from
the truncated SVD of W, only R (r × r) trained; s = alpha/r (alpha/√r with rsLoRA), as the LoRA scale the
reference code applies. Trainable parameters per module: r².

Init: R ~ N(0, σ²) with σ = `adapter.lora_xs_init_std` (default 1e-5, the reference implementation's
`init_module_weights(..., sigma=0.00001)`), so at init the model differs from the base by s·B·R·A, of the
order σ·s·‖S_r‖ (tiny, not zero); σ = 0 gives R = 0 and an exact init. `adapter.svd_niter` selects the fast
randomized SVD (the reference code also uses a randomized SVD).

Hand-written (PEFT has no LoRA-XS): each target linear layer is wrapped by `LoraXSLinear`, which keeps the
base layer (16/32-bit or bitsandbytes 4-bit: QLoRA-style, SVD of the de-quantised weight, base stays 4-bit)
and adds buffers A, B and the parameter R; y = base(x) + s·B·R·A·dropout(x).

Saved layout (`save_adapter`): `lora_xs_config.json` (r, scale, modules, per-module sha256 fingerprints of
the base weights, 4-bit settings) + `lora_xs_model.safetensors` (`<module>.lora_xs_{A,B,R}`), and a standard
rank-r PEFT LoRA in `peft_lora/` (lora_B = s·B·R, lora_A = A, lora_alpha = r so PEFT's scale is 1) that plain
PEFT and vLLM can serve. Two LoRA-XS adapters of one base and rank share A and B bit for bit, so they sum
into one adapter of the same size by adding R (`tunekit merge`, adapter_sum).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.adapters import AttachContext, register
from tunekit.adapters import _svd as S
from tunekit.adapters.lora import prepare_base
from tunekit.config.schema import AdapterConfig
from tunekit.errors import TunekitError

CONFIG = "lora_xs_config.json"
WEIGHTS = "lora_xs_model.safetensors"
PEFT_EXPORT = "peft_lora"
FORMAT = "tunekit-lora-xs-1"


class LoraXSLinear(nn.Module):
    """y = base(x) + scale · B R A dropout(x); A, B frozen buffers, R the only trainable tensor."""

    def __init__(
        self, base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, r_init: torch.Tensor, scale: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("lora_xs_A", a)
        self.register_buffer("lora_xs_B", b)
        self.lora_xs_R = nn.Parameter(r_init)

    @property
    def weight(self) -> torch.Tensor:  # some code (generation utils, PEFT helpers) reads `.weight`
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        h = self.dropout(x).to(self.lora_xs_R.dtype)
        h = F.linear(F.linear(F.linear(h, self.lora_xs_A), self.lora_xs_R), self.lora_xs_B)
        return result + (h * self.scale).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·R·A in float32 (d_out × d_in)."""
        return merge_delta(self.lora_xs_A, self.lora_xs_B, self.lora_xs_R, self.scale)


def merge_delta(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (b.to(torch.float32) @ r.to(torch.float32) @ a.to(torch.float32))


def merge_into_weight(w: torch.Tensor, tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """W' = W + s·B·R·A for one module; `tensors` has keys A, B, R."""
    return w.to(torch.float32) + merge_delta(tensors["A"], tensors["B"], tensors["R"], scale)


def _scale(cfg: AdapterConfig) -> float:
    return cfg.lora_alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.lora_alpha / cfg.r


def build_lora_xs(model: Any, cfg: AdapterConfig, ctx: AttachContext) -> Any:
    S.check_no_extras(cfg, ctx, "lora_xs")
    model = prepare_base(model, ctx)
    S.freeze(model.parameters())
    r, scale = cfg.r, _scale(cfg)
    fingerprints: dict[str, str] = {}
    quant = None
    for name, layer in S.target_modules(model, cfg.targets):
        d_out, d_in = S.linear_shape(layer)
        if r > min(d_out, d_in):
            raise TunekitError(f"adapter.r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} of '{name}'")
        if ctx.meta:  # counting only: right shapes, no SVD
            a = torch.empty(r, d_in, device="meta")
            b = torch.empty(d_out, r, device="meta")
            r0 = torch.empty(r, r, device="meta")
        else:
            w = S.dense_weight(layer)
            fingerprints[name] = S.fingerprint_tensor(w)
            quant = S.quant_info(layer)
            u, s, vh = S.svd(w, niter=cfg.svd_niter, rank=r)
            # adapter tensors in float32 whatever the base dtype (as PEFT's autocast_adapter_dtype)
            dtype, device = torch.float32, layer.weight.device
            b = (u[:, :r] * s[:r]).to(device=device, dtype=dtype).contiguous()
            a = vh[:r].to(device=device, dtype=dtype).contiguous()
            r0 = torch.zeros(r, r, device=device, dtype=dtype)
            if cfg.lora_xs_init_std > 0:
                r0.normal_(0.0, cfg.lora_xs_init_std)
        S.replace_module(model, name, LoraXSLinear(layer, a, b, r0, scale, cfg.dropout))
    model.tunekit_adapter = {
        "format": FORMAT,
        "r": r,
        "scale": scale,
        "targets": cfg.targets,
        "fingerprints": fingerprints,
        "base_quantization": quant,
    }
    S.allow_quantized_training(model)
    return model


def _wrapped(model: nn.Module) -> dict[str, LoraXSLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraXSLinear)}


def save_lora_xs(model: Any, out_dir: Path) -> None:
    """Write `lora_xs_config.json` + `lora_xs_model.safetensors` and the plain PEFT export in `peft_lora/`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = getattr(model, "tunekit_adapter", None)
    layers = _wrapped(model)
    if meta is None or not layers:
        raise TunekitError("save_lora_xs: the model has no LoRA-XS layers")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for part in ("A", "B", "R"):
            tensors[f"{name}.lora_xs_{part}"] = getattr(layer, f"lora_xs_{part}").detach().cpu().contiguous()
    fps = meta["fingerprints"]
    config = {
        "tunekit_adapter": "lora_xs",
        "format": FORMAT,
        "r": meta["r"],
        "scale": meta["scale"],
        "modules": sorted(layers),
        "module_fingerprints": fps,
        "base_fingerprint": S.combine_fingerprints(fps),
        "base_quantization": meta["base_quantization"],
        "base_model_name_or_path": S.base_name_of(model),
    }
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    S.write_json(out_dir / CONFIG, config)
    export_peft_lora(out_dir)


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = S.read_json(folder / CONFIG)
    if config.get("format") != FORMAT:
        raise TunekitError(f"{folder / CONFIG}: not a {FORMAT} adapter (format {config.get('format')!r})")
    if not (folder / WEIGHTS).is_file():
        raise TunekitError(f"adapter '{folder}': {WEIGHTS} not found")
    return config, load_file(str(folder / WEIGHTS))


def _short_targets(modules: list[str], all_linear: list[str]) -> list[str]:
    """q_proj, v_proj, ... when the suffixes pick exactly these modules, else the full module names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    picked = [n for n in all_linear if n.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(picked) == sorted(modules) else sorted(modules)


def export_peft_lora(folder: Path, out: Path | None = None) -> Path:
    """A standard rank-r PEFT LoRA (B = s·U_r S_r R, A = V_r^T, lora_alpha = r) from a saved LoRA-XS adapter,
    written to `folder/peft_lora` (or `out`). Also usable after adapter_sum."""
    from peft import LoraConfig, TaskType
    from safetensors.torch import save_file

    folder = Path(folder)
    out = Path(out) if out is not None else folder / PEFT_EXPORT
    config, tensors = _read(folder)
    r, scale = int(config["r"]), float(config["scale"])
    modules = list(config["modules"])
    lora: dict[str, torch.Tensor] = {}
    for name in modules:
        a, b, rr = (tensors[f"{name}.lora_xs_{p}"] for p in ("A", "B", "R"))
        new_b = scale * (b.to(torch.float32) @ rr.to(torch.float32))
        lora[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        lora[f"base_model.model.{name}.lora_B.weight"] = new_b.to(b.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    peft_cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=_short_targets(modules, modules),
        bias="none",
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )
    peft_cfg.save_pretrained(str(out))
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def load_lora_xs(model: Any, folder: Path) -> Any:
    """Apply a saved LoRA-XS adapter to a loaded base. Refuses another base (fingerprints)."""
    folder = Path(folder)
    config, tensors = _read(folder)
    where = f"LoRA-XS adapter '{folder}'"
    quant = config.get("base_quantization")
    modules = dict(model.named_modules())
    for name in config["modules"]:
        layer = modules.get(name)
        if layer is None or not S.is_linear(layer):
            raise TunekitError(f"{where}: the base model has no linear layer '{name}' (a different architecture)")
        if not (S.is_4bit(layer) and quant is None):
            w = S.weight_as_trained(layer, quant, where)
            S.check_fingerprint(name, w, config["module_fingerprints"][name], where)
        device = layer.weight.device
        a, b, rr = (tensors[f"{name}.lora_xs_{p}"].to(device=device, dtype=torch.float32) for p in ("A", "B", "R"))
        S.replace_module(model, name, LoraXSLinear(layer, a, b, rr, float(config["scale"])))
    S.freeze(model.parameters())
    model.tunekit_adapter = {
        "format": FORMAT,
        "r": int(config["r"]),
        "scale": float(config["scale"]),
        "targets": config["modules"],
        "fingerprints": config["module_fingerprints"],
        "base_quantization": quant,
    }
    return model


def plan_merge(folder: Path, base: Any) -> dict[str, Any]:
    """`tunekit merge` hook: per base tensor `<module>.weight`, W ↦ W + s·B·R·A (fingerprint checked)."""
    config, tensors = _read(Path(folder))
    where = f"LoRA-XS adapter '{folder}'"
    quant = config.get("base_quantization")
    scale = float(config["scale"])

    def merge_for(name: str) -> Any:
        parts = {p: tensors[f"{name}.lora_xs_{p}"] for p in ("A", "B", "R")}
        return lambda w, seen: merge_into_weight(w, parts, scale)

    modules = [(name, config["module_fingerprints"][name], merge_for(name)) for name in config["modules"]]
    return S.fingerprinted_edits(modules, base, quant, where)


def summable(tensor_name: str) -> bool:
    """adapter_sum adds R; A and B must be bit-identical (same base, same SVD)."""
    return tensor_name.endswith(".lora_xs_R")


KIND = register(
    S.own_format_kind(
        "lora_xs",
        build_lora_xs,
        "LoRA-XS: W + s·(U_r S_r) R V_r^T, only R (r x r) trains",
        config_file=CONFIG,
        weights_file=WEIGHTS,
        plan_merge=plan_merge,
        summable=summable,
        save=lambda model, cfg, out: save_lora_xs(model, out),
        load=load_lora_xs,
        finalize=export_peft_lora,  # the summed R needs a fresh plain-LoRA export
        export_lora=lambda folder: Path(folder) / PEFT_EXPORT,
    )
)
