"""Load a base model and tokenizer from a recipe's `model` section.

Handles: the `smollm2-135m` alias, dtype `auto` by device, attention implementation, 4/8-bit via
bitsandbytes, pad-token fix, chat-template fallback, and config-only meta-device builds for `--dry-run`.

Chaining runs: `model.name` may be a finished run directory or an adapter folder (tunekit.run.locate). A
full-fine-tune run (RUN/model) loads directly; an adapter is folded into its base in memory (W' = W + ΔW, every
adapter kind, tunekit.adapters.fold_adapter), recursively when that base is itself a run (sft -> dpo -> grpo),
with the run's saved tokenizer (it may carry added chat tokens). The policy then starts from the earlier
result and, with a new adapter, the adapter-disabled reference is that folded model (as the DPO paper
prescribes). With 4/8-bit loading the fold happens in 16-bit and the folded model is quantized afterwards.
The loaded model records the chain in `model.tunekit_chain` (oldest first) for the run card.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.config.schema import ModelConfig
from tunekit.errors import TunekitError
from tunekit.models.embedded import ALIASES
from tunekit.run.locate import Located, base_of, locate

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_path(name: str, revision: str | None = None) -> Path | str:
    """Alias → cached folder; existing path → Path; cached hub id → its snapshot; else the hub id, only when the
    hub can be asked (tunekit.models.resolve: one resolver for every command)."""
    from tunekit.models.resolve import resolve_model

    return resolve_model(name, revision)


def device_type() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): oneDNN then runs a bf16 matmul ~4x faster
    than an fp32 one (1676 LoRA-step matmuls on SmolLM2-135M: 1.65 s vs 6.57 s on one core of our Xeon)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def stored_dtype(cfg: ModelConfig) -> str | None:
    """The dtype the checkpoint's weights are stored in (config.json `dtype`/`torch_dtype`), or None."""
    try:
        config = load_config(cfg)
    except TunekitError:
        return None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(stored).removeprefix("torch.") if stored is not None else None


def resolve_dtype(cfg: ModelConfig, frozen: bool = False) -> torch.dtype:
    """The weights' dtype. An explicit `model.dtype` wins. `auto`:
    - CUDA GPUs that support bf16: bf16 (fp16 training needs a loss scaler and loses range);
    - a CPU, with `frozen` (the base weights stay fixed, an adapter trains): bf16 when the checkpoint is itself
      stored in bf16 (nothing is lost) and the CPU multiplies bf16 natively (`cpu_has_native_bf16`). The
      adapter's own weights stay fp32 (PEFT's `autocast_adapter_dtype`, ours likewise), as in QLoRA's recipe of a
      16-bit frozen base under fp32 adapters (Dettmers et al., 2023). Half the weight and activation memory, and
      ~1.8x the step rate of fp32 on such a CPU;
    - otherwise fp32 (a CPU without bf16 units is slower in bf16; full fine-tuning keeps fp32 master weights)."""
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device_type() == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if (device_type() == "cpu" and frozen and not quantized and cpu_has_native_bf16()
            and stored_dtype(cfg) == "bfloat16"):
        return torch.bfloat16
    return torch.float32


def with_resolved_dtype(cfg: ModelConfig, frozen: bool) -> ModelConfig:
    """`cfg` with `auto` replaced by what `resolve_dtype` picks, so every later load (a chained base, the
    folded model, a reward model beside it) uses that one choice."""
    return cfg.model_copy(update={"dtype": str(resolve_dtype(cfg, frozen)).removeprefix("torch.")})


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


def earlier_run(cfg: ModelConfig) -> Located | None:
    """The finished run or adapter folder `cfg.name` names (chaining), else None (alias, hub id, model)."""
    if cfg.name in ALIASES:
        return None
    loc = locate(cfg.name)
    return loc if loc is not None and loc.kind != "model" else None


def refuse_reward_model_as_policy(cfg: ModelConfig, task: str) -> None:
    """A run of `tunekit rm` is a scorer (a one-output head), not a language model: chaining a policy stage (dpo,
    grpo, sft, ...) from it would silently drop its head and train a base that never learned to generate."""
    if task != "causal_lm":
        return
    loc = earlier_run(cfg)
    if loc is None or loc.run_dir is None:
        return
    from tunekit.config.load import read_yaml_file

    recipe = read_yaml_file(loc.run_dir / "recipe.yaml", "run recipe") or {}
    if isinstance(recipe, dict) and recipe.get("stage") == "rm":
        raise TunekitError(f"model.name '{cfg.name}' is a reward model (a `tunekit rm` run): it scores text and "
                           "cannot be trained or used as a policy; start from its base model, and use the run as "
                           f"a reward: rewards: [{{name: reward_model, path: {cfg.name}}}]")


def _base_of(loc: Located, cfg: ModelConfig) -> ModelConfig:
    """The section to load an earlier adapter's base with: its name and revision from the run that trained it,
    every loading option (dtype, attention, trust_remote_code, template) from the current recipe."""
    if base_of(loc) is None:
        raise TunekitError(f"adapter '{loc.adapter_dir}' does not name its base model (no run recipe.yaml, no "
                           "base_model_name_or_path in adapter_config.json)")
    return cfg.model_copy(update={"name": loc.base.name, "revision": loc.base.revision})


def _saved_tokenizer_dir(loc: Located) -> Path | None:
    folder = loc.model_dir or loc.adapter_dir
    return folder if folder is not None and (folder / "tokenizer_config.json").is_file() else None


def chain_of(cfg: ModelConfig) -> list[dict[str, Any]]:
    """The runs folded into the model `cfg` names, oldest first: [{path, kind, base}] (no weights read)."""
    chain: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while (loc := earlier_run(cfg)) is not None:
        path = loc.path.resolve()
        if path in seen or len(seen) > 64:
            raise TunekitError(f"model.name '{cfg.name}': the chain of runs loops back to '{loc.path}'")
        seen.add(path)
        if loc.model_dir is not None:
            chain.append({"path": str(path), "kind": "full", "model": str(loc.model_dir.resolve())})
            break
        from tunekit.adapters import kind_of

        base = _base_of(loc, cfg)
        chain.append({"path": str(path), "kind": kind_of(loc.adapter_dir).name, "base": base.name})
        cfg = base
    return chain[::-1]


def root_model(cfg: ModelConfig) -> ModelConfig:
    """The section of the model at the bottom of a chain (a full-fine-tune run's model/ folder, or the base the
    first adapter was trained on); `cfg` itself when it names no run."""
    for _ in range(66):
        loc = earlier_run(cfg)
        if loc is None:
            return cfg
        if loc.model_dir is not None:
            return cfg.model_copy(update={"name": str(loc.model_dir)})
        cfg = _base_of(loc, cfg)
    raise TunekitError(f"model.name '{cfg.name}': a chain of more than 64 runs")


def load_config(cfg: ModelConfig):
    """The model's transformers config (config.json only; no weights); of the chain's root for a run."""
    from transformers import AutoConfig

    from tunekit.models.sizes import check_config_sizes

    cfg = root_model(cfg)
    path = resolve_model_path(cfg.name, cfg.revision)
    raw = Path(path) / "config.json" if isinstance(path, Path) and Path(path).is_dir() else None
    if raw is not None and raw.is_file():  # impossible sizes are refused before transformers sees them
        from tunekit.run.locate import read_json_config

        check_config_sizes(read_json_config(raw), str(raw))
    try:
        config = AutoConfig.from_pretrained(str(path), **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(cfg.name, exc) from None
    check_config_sizes(config.to_dict(), f"{cfg.name}/config.json")
    return config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template (the model's own, or the recipe's / `chatml`). For a run
    or adapter folder: the tokenizer saved with it (else its base's)."""
    from transformers import AutoTokenizer

    from tunekit.data.templates import apply_template_choice

    seen: set[Path] = set()
    while (loc := earlier_run(cfg)) is not None:  # down the chain of runs to the first that saved a tokenizer
        saved = _saved_tokenizer_dir(loc)
        if saved is not None:
            path: Path | str = saved
            break
        if loc.path.resolve() in seen or len(seen) > 64:
            raise TunekitError(f"model.name '{cfg.name}': the chain of runs loops back to '{loc.path}'")
        seen.add(loc.path.resolve())
        cfg = _base_of(loc, cfg) if loc.model_dir is None else cfg.model_copy(update={"name": str(loc.model_dir)})
    else:
        path = resolve_model_path(cfg.name, cfg.revision)
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
    """Load the causal LM named by `cfg` (weights read), sized to the tokenizer if tokens were added. A run or
    adapter folder is loaded as its base with the adapter folded in (see the module docstring).

    task="seq_cls": the same backbone with a one-output score head (a reward model, r(x, y) ∈ R)."""
    refuse_reward_model_as_policy(cfg, task)
    loc = earlier_run(cfg)
    if loc is None:
        model = _load_plain(cfg, tokenizer, task)
    elif loc.model_dir is not None:
        model = _load_plain(cfg.model_copy(update={"name": str(loc.model_dir)}), tokenizer, task)
    else:
        model = _load_folded(cfg, loc, tokenizer, task)
    model.tunekit_chain = chain_of(cfg)
    return model


def _load_folded(
    cfg: ModelConfig, loc: Located, tokenizer: PreTrainedTokenizerBase | None, task: str
) -> PreTrainedModel:
    """Base (16/32-bit, itself folded when it is a run) + the earlier adapter merged in; quantized after."""
    from tunekit.adapters import fold_adapter

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    base = _base_of(loc, cfg).model_copy(update={"load_in_4bit": False, "load_in_8bit": False})
    model = fold_adapter(load_model(base, tokenizer, task), loc.adapter_dir)
    if hasattr(model, "tunekit_new_token_ids"):  # rows the earlier run trained are no longer new
        saved = _saved_tokenizer_dir(loc)
        if saved is not None:
            from transformers import AutoTokenizer

            trained_rows = len(AutoTokenizer.from_pretrained(str(saved)))
            model.tunekit_new_token_ids = [i for i in model.tunekit_new_token_ids if i >= trained_rows]
        if not model.tunekit_new_token_ids:
            del model.tunekit_new_token_ids
    if not quantized:
        return model
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="tunekit-folded-")
    model.save_pretrained(tmp.name, safe_serialization=True)
    new_ids = getattr(model, "tunekit_new_token_ids", None)
    del model
    quant_model = _load_plain(cfg.model_copy(update={"name": tmp.name}), tokenizer, task)
    quant_model.tunekit_folded_dir = tmp  # the folded 16-bit weights, removed with the model
    if new_ids:
        quant_model.tunekit_new_token_ids = new_ids
    return quant_model


def _load_plain(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, task: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name, cfg.revision)
    load_config(cfg)  # config.json's sizes checked before any weight is allocated
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


def build_meta_model(cfg: ModelConfig, task: str = "causal_lm") -> PreTrainedModel:
    """Instantiate the architecture on the meta device from config.json alone (no weights read).

    Works on a folder that holds only a config.json; quantization flags are ignored (counts are the same).
    task="seq_cls" builds the reward-model form (one-output score head).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    refuse_reward_model_as_policy(cfg, task)
    config = load_config(cfg)
    auto = AutoModelForCausalLM
    if task == "seq_cls":
        config.num_labels = 1
        auto = AutoModelForSequenceClassification
    with torch.device("meta"):
        try:
            model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
        except ValueError as exc:
            raise _wrap_load_error(cfg.name, exc) from None
        loc = earlier_run(cfg)
        saved = _saved_tokenizer_dir(loc) if loc is not None else None
        if saved is not None:  # a run whose template added tokens: the vocabulary it trained with
            rows = len(load_tokenizer(cfg))
            if rows > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(rows, mean_resizing=False)
    model.tunekit_chain = chain_of(cfg)
    return model

