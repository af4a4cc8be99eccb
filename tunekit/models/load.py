"""Load a base model and tokenizer from a recipe's `model` section.

Handles: the `smollm2-135m` alias, dtype `auto` by device, attention implementation, 4/8-bit via
bitsandbytes, pad-token fix, chat-template fallback, and config-only meta-device builds for `--dry-run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.config.schema import ModelConfig
from tunekit.errors import TunekitError
from tunekit.models.embedded import ALIASES, embedded_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_path(name: str) -> Path | str:
    """Alias → cached folder; existing path → Path; otherwise the hub id unchanged."""
    if name in ALIASES:
        return embedded_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise TunekitError(f"model folder '{path}' has no config.json")
        return path
    if name.startswith((".", "/", "~")):
        raise TunekitError(f"model path '{name}' does not exist")
    return name


def device_type() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """`auto`: bf16 on CUDA GPUs that support it, else fp32 (fp16 training needs a loss scaler and loses
    range; on CPU bf16 matmuls are slower and lossy)."""
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device_type() == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _attn(cfg: ModelConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device_type() == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def _wrap_load_error(name: str, exc: Exception) -> TunekitError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TunekitError(f"cannot load model '{name}': {first}")


def load_config(cfg: ModelConfig):
    """The model's transformers config (config.json only; no weights)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name)
    try:
        return AutoConfig.from_pretrained(str(path), **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(cfg.name, exc) from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template (the model's own, or the recipe's / `chatml`)."""
    from transformers import AutoTokenizer

    from tunekit.data.templates import apply_template_choice

    path = resolve_model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(cfg.name, exc) from None
    apply_template_choice(tok, cfg.chat_template)
    fix_pad_token(tok)
    return tok


def fix_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token. Our labels come from explicit masks, so pad == eos is safe here:
    the EOS of each assistant turn stays in the loss (a classic cause of models that never stop)."""
    if tok.pad_token is not None:
        return
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"):
        if candidate in tok.get_vocab():
            tok.pad_token = candidate
            return
    if tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise TunekitError("tokenizer has no pad, unk or eos token to pad with")
    tok.padding_side = "right"


def _quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunekitError("model.load_in_4bit/8bit needs bitsandbytes: pip install 'tunekit[bnb]'")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, task: str = "causal_lm"
) -> PreTrainedModel:
    """Load the causal LM named by `cfg` (weights read), sized to the tokenizer if tokens were added.

    task="seq_cls": the same backbone with a one-output score head (a reward model, r(x, y) ∈ R)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name)
    dtype = resolve_dtype(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": _attn(cfg), **_hub_kwargs(cfg)}
    qcfg = _quantization_config(cfg, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": 0} if device_type() == "cuda" else {"": "cpu"}
    if task == "seq_cls":
        kwargs["num_labels"] = 1
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(cfg.name, exc) from None
    if qcfg is None and device_type() != "cpu":
        model.to(device_type())
    if tokenizer is not None:
        _match_tokenizer(model, tokenizer)
    return model


def _match_tokenizer(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Grow embeddings (mean-initialised) when the template added tokens, remembering their ids in
    `model.tunekit_new_token_ids`; align eos/pad ids for generation."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
        model.tunekit_new_token_ids = list(range(rows, len(tok)))  # trained by the adapter (trainable tokens)
    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None:  # a reward model does not generate
        return
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if isinstance(gen.eos_token_id, int):
        eos.add(gen.eos_token_id)
    elif isinstance(gen.eos_token_id, list):
        eos.update(gen.eos_token_id)
    end_turn = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end_turn is not None and tok.chat_template and "<|im_end|>" in tok.chat_template:
        eos.add(end_turn)
    gen.eos_token_id = sorted(eos) if len(eos) > 1 else (next(iter(eos)) if eos else None)
    gen.pad_token_id = tok.pad_token_id
    model.config.pad_token_id = tok.pad_token_id


def build_meta_model(cfg: ModelConfig) -> PreTrainedModel:
    """Instantiate the architecture on the meta device from config.json alone (no weights read).

    Works on a folder that holds only a config.json; quantization flags are ignored (counts are the same).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(cfg)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        except ValueError as exc:
            raise _wrap_load_error(cfg.name, exc) from None

