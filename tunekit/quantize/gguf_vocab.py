"""Tokenizer → GGUF metadata: token list, scores/types, merges, pre-tokenizer, special tokens, chat template.

gguf-py supplies the pieces (`SpecialVocab` for merges/special ids/chat template, `SentencePieceVocab` for
`tokenizer.model`). Written here by hand: the BPE token list from `tokenizer.json` and the choice of
llama.cpp's pre-tokenizer name, which we read from the structure of the HF pre-tokenizer (llama.cpp's
own converter fingerprints a hash of sample tokenizations instead; we only name splitters we recognise and
refuse the rest, so a GGUF never silently tokenizes differently from the HF tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

# Regexes of HF `Split` pre-tokenizers and the llama.cpp pre-tokenizer type that applies the same split.
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_SPLIT_REGEXES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2", _GPT2_REGEX: "gpt-2"}


def _flatten(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _flatten(sub)]
    return [pre]


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any], source: str = "tokenizer.json") -> str:
    """Name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) that splits text like this HF tokenizer.

    Recognised: GPT-2 byte-level (`gpt-2`), digits-then-GPT-2 as in SmolLM/StarCoder (`smollm`),
    Llama 3 (`llama-bpe`) and Qwen2/3 (`qwen2`) regex splits.
    """
    steps = _flatten(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex in _SPLIT_REGEXES:
            return _SPLIT_REGEXES[regex]
    raise TunekitError(
        f"{source}: pre-tokenizer {kinds} is not one tunekit can map to llama.cpp "
        "(supported: GPT-2 byte-level, SmolLM digits+byte-level, Llama 3 and Qwen2 regex splits)"
    )


def _add_special_flags(tok: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer prepends BOS / appends EOS by itself (measured, not read from a flag)."""
    bare = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(full) > len(bare) and full[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(full) > len(bare) and full[-1] == tok.eos_token_id
    return bool(add_bos), bool(add_eos)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<") and text.endswith(">"))


def add_vocab(writer: Any, folder: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer of the HF model in `folder` into `writer`; returns a summary for the run card.

    BPE (`tokenizer.json` with a BPE model) becomes `tokenizer.ggml.model = gpt2`; a SentencePiece
    `tokenizer.model` becomes `llama` (with scores and byte tokens).
    """
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    model_type = tj.get("model", {}).get("type")
    summary: dict[str, Any] = {}

    if ((folder / "tokenizer.model").is_file() and model_type != "BPE") or model_type == "Unigram":
        if not (folder / "tokenizer.model").is_file():
            raise TunekitError(
                f"{folder}: Unigram tokenizer without tokenizer.model is not supported for GGUF"
            )
        sp = gguf.vocab.SentencePieceVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in sp.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        summary.update(model="llama (SentencePiece)", pre="default", tokens=len(tokens))
    elif model_type == "BPE":
        pre = bpe_pre_tokenizer(tj, str(tj_path))
        id_to_tok = {i: t for t, i in tj["model"]["vocab"].items()}
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        n = max(vocab_size, max(list(id_to_tok) + list(added)) + 1)
        tokens, types = [], []
        for i in range(n):
            if i in added:
                a = added[i]
                text = a["content"]
                if a.get("special") or _looks_special(text):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    # llama.cpp matches user-defined tokens on raw text, not byte-level-encoded text
                    types.append(gguf.TokenType.USER_DEFINED)
                tokens.append(text)
            elif i in id_to_tok:
                tokens.append(id_to_tok[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        summary.update(model="gpt2 (BPE)", pre=pre, tokens=len(tokens))
    else:
        raise TunekitError(
            f"{folder}: tokenizer type {model_type!r} is not supported for GGUF (BPE tokenizer.json or "
            "SentencePiece tokenizer.model)"
        )

    special = gguf.SpecialVocab(folder, load_merges=model_type == "BPE", n_vocab=len(tokens))
    add_bos, add_eos = _add_special_flags(tok)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    # Ids from the loaded tokenizer win over config.json guesses (they are what HF encodes with).
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            special.special_token_ids[kind] = int(tid)
    template = getattr(tok, "chat_template", None)
    if template and special.chat_template is None:
        special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    summary.update(add_bos=add_bos, add_eos=add_eos, chat_template=special.chat_template is not None)
    return summary
