"""What a served model needs to stop where the tuned model stops: its end-of-turn tokens.

The end-of-turn token of a chat template is read from the template itself: render a conversation that ends
with an assistant message, and the first special token right after the answer's text is the token the model
learned to emit when it is done (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3). Servers stop on the ids in
`generation_config.json` `eos_token_id` (transformers, vLLM) or on the GGUF's EOS/EOG tokens (llama.cpp,
Ollama): a tuned model whose end-of-turn token is missing there "never stops" once served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "ANSWER_TEXT_PROBE"}]


def _special_tokens(tok: Any) -> list[str]:
    names = set(getattr(tok, "all_special_tokens", []) or [])
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    names.update(str(t) for t in decoder.values() if getattr(t, "special", False))
    return sorted((n for n in names if n), key=len, reverse=True)


def end_of_turn_tokens(tok: Any) -> list[str]:
    """The special tokens that close an assistant turn in `tok`'s chat template (else the EOS token)."""
    found: list[str] = []
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(PROBE, tokenize=False)
        except Exception:  # a template that refuses this conversation: fall back to the EOS token
            text = ""
        at = text.find(PROBE[-1]["content"])
        if at >= 0:
            rest = text[at + len(PROBE[-1]["content"]):].lstrip(" ")
            for name in _special_tokens(tok):
                if rest.startswith(name):
                    found.append(name)
                    break
    eos = getattr(tok, "eos_token", None)
    if not found and eos:
        found.append(eos)
    return found


def end_of_turn_ids(tok: Any) -> list[int]:
    ids = [tok.convert_tokens_to_ids(t) for t in end_of_turn_tokens(tok)]
    return [int(i) for i in ids if i is not None and i != getattr(tok, "unk_token_id", None)]


def stop_ids(tok: Any, generation_config: Any = None) -> list[int]:
    """Every id generation stops at: the template's end-of-turn tokens, the tokenizer's EOS, and the
    generation config's `eos_token_id` (an int or a list)."""
    ids = set(end_of_turn_ids(tok))
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return sorted(ids)


def folder_stop_ids(folder: str | Path) -> list[int]:
    """The ids transformers and vLLM stop at for a model folder: `generation_config.json` `eos_token_id`,
    else `config.json`'s."""
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                return sorted({int(value)} if isinstance(value, int) else {int(v) for v in value})
    return []


def write_generation_config(folder: str | Path, tok: Any | None = None) -> list[int]:
    """Make `folder/generation_config.json` list the end-of-turn tokens of the folder's chat template among
    `eos_token_id` (kept as an int when there is one id); returns the ids."""
    folder = Path(folder)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    path = folder / "generation_config.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not data:
        cfg = folder / "config.json"
        base = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
        data = {k: base[k] for k in ("bos_token_id", "pad_token_id") if base.get(k) is not None}
    have = data.get("eos_token_id")
    ids = set() if have is None else ({int(have)} if isinstance(have, int) else {int(i) for i in have})
    ids.update(end_of_turn_ids(tok))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    ordered = sorted(ids)
    data["eos_token_id"] = ordered[0] if len(ordered) == 1 else ordered
    if tok.pad_token_id is not None and data.get("pad_token_id") is None:
        data["pad_token_id"] = int(tok.pad_token_id)
    data.setdefault("_from_model_config", False)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return ordered


def run_system_prompt(target: str | Path) -> str | None:
    """The `data.system_prompt` of the run `target` is (or sits in): the model was trained with it."""
    from tunekit.config.load import read_yaml_file

    p = Path(target)
    for run in (p, p.parent):
        if (run / "recipe.yaml").is_file():
            data = read_yaml_file(run / "recipe.yaml", "run recipe") or {}
            section = data.get("data") if isinstance(data, dict) else None
            value = section.get("system_prompt") if isinstance(section, dict) else None
            return value if isinstance(value, str) and value else None
    return None
