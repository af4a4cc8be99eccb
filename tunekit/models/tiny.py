"""Tiny models for tests and examples: a locally trained byte-level BPE tokenizer and a random Llama.

Nothing here touches the network. `build_tiny_model(folder)` writes a folder that
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load like any hub model.
"""

from __future__ import annotations

from pathlib import Path

# ChatML with `{% generation %}` markers so transformers' `return_assistant_tokens_mask` works on it.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task.",
    "What is the capital of France? The capital of France is Paris.",
    "Low-rank adapters train a small number of parameters.",
    "Translate to French: good morning. Bonjour.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Numbers: 0123456789, symbols: !@#$%^&*()_+-=[]{};':\",./<>?",
    "Unicode: café, naïve, Ñandú, 東京, Привет, 😀.",
    "user assistant system You are a helpful assistant.",
    "Summarize the text in one sentence. Answer yes or no.",
    "  leading spaces,\ttabs and\nnew lines\n\n matter to tokenizers.",
]


def build_tiny_tokenizer(vocab_size: int = 512, chat_template: str | None = TINY_CHAT_TEMPLATE):
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) on a small corpus; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    """LlamaConfig(hidden 64, 2 layers, 4 heads, 2 KV heads): a real Llama graph in ~100k parameters."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_model(
    folder: str | Path,
    seed: int = 0,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    **config_overrides,
) -> Path:
    """Write a tiny random Llama + tokenizer to `folder` (safetensors). Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tok = build_tiny_tokenizer(chat_template=chat_template)
    cfg = tiny_llama_config(
        len(tok),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init with std 0.02 gives near-uniform logits; larger weights make tests sensitive to bugs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
