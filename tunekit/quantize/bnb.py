"""bitsandbytes (the `bnb` extra): NF4 / FP4 4-bit (Dettmers et al., 2023, QLoRA) or LLM.int8() 8-bit
(Dettmers et al., 2022) weights, saved as a transformers folder with its `quantization_config`.

NF4 stores each weight as the nearest of 16 quantiles of N(0,1), scaled per block of 64 by absmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

INSTALL_HINT = "install bitsandbytes: `pip install 'tunekit[bnb]'`"


def quantize_bnb(model_folder: str | Path, output: str | Path, qtype: str = "NF4") -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunekitError(f"bitsandbytes is not installed; {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qtype = qtype.upper()
    if qtype == "INT8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    elif qtype in ("NF4", "FP4"):
        cfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qtype.lower(), bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        raise TunekitError(f"--type {qtype} is not a bitsandbytes type (NF4, FP4, INT8)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_folder), quantization_config=cfg, device_map=device
        )
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise TunekitError(f"bitsandbytes {qtype} failed on {device}: {str(exc).splitlines()[0]}") from None
    model.save_pretrained(str(output))
    AutoTokenizer.from_pretrained(str(model_folder)).save_pretrained(str(output))
    return {"quantizer": "bitsandbytes", "bnb_type": qtype, "device": device}
