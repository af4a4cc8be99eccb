"""Preference pairs (rm, dpo) and prompt-only records (grpo, ppo), normalised per record with file:line errors.

| format                  | fields                                                                        |
|-------------------------|-------------------------------------------------------------------------------|
| preference              | prompt + chosen + rejected (strings or message lists), optional margin        |
| preference_transcript   | chosen + rejected full transcripts sharing a prompt (HH-RLHF style; message    |
|                         | lists or "\\n\\nHuman: ... \\n\\nAssistant: ..." strings), optional margin     |
| prompt                  | prompt (string or messages) or messages; every other column is kept for rewards |
| unpaired                | prompt + completion (strings or message lists) + label (true = desirable,      |
|                         | false = undesirable): KTO's binary feedback                                   |

Canonical pair: prompt = the turns before the answer, chosen/rejected = the assistant turn(s) that answer it.
A transcript pair is split at its last assistant turn; the two prompts must be identical. UltraFeedback
(binarized) gives `prompt` plus full transcripts in chosen/rejected: the transcripts win, and must agree.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from tunekit.config.schema import DataConfig
from tunekit.data.formats import Messages, _check_messages, _text
from tunekit.data.pipeline import apply_weights, as_sources, eval_count
from tunekit.data.sources import read_source
from tunekit.errors import TunekitError

#: hub datasets whose layout we know: the split and format to use when the recipe names neither.
HUB_PRESETS: dict[str, dict[str, str]] = {
    "HuggingFaceH4/ultrafeedback_binarized": {"split": "train_prefs", "format": "preference",
                                              "eval_split": "test_prefs"},
    "trl-lib/ultrafeedback_binarized": {"split": "train", "format": "preference", "eval_split": "test"},
    "Anthropic/hh-rlhf": {"split": "train", "format": "preference_transcript", "eval_split": "test"},
    "trl-lib/hh-rlhf-helpful-base": {"split": "train", "format": "preference", "eval_split": "test"},
    "openai/gsm8k": {"split": "train", "format": "prompt", "name": "main", "eval_split": "test"},
}
PREFERENCE_FORMATS = ("auto", "preference", "preference_transcript")
FEEDBACK_FORMATS = ("auto", "unpaired", "preference", "preference_transcript")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class PreferencePair:
    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float | None
    where: str
    source: int = 0

    def as_row(self) -> dict[str, Any]:
        """TRL's conversational preference row (explicit prompt)."""
        row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        row["margin"] = float(self.margin or 0.0)
        return row


@dataclass
class FeedbackRecord:
    """One unpaired example (KTO): a prompt, one answer, and whether the answer is desirable."""

    prompt: Messages
    completion: Messages
    label: bool
    where: str
    source: int = 0

    def as_row(self) -> dict[str, Any]:
        """TRL's conversational unpaired preference row."""
        return {"prompt": self.prompt, "completion": self.completion, "label": self.label}


@dataclass
class PromptRecord:
    prompt: Messages
    columns: dict[str, Any]  # every other column of the record (answer, tests, ...) for the rewards
    where: str
    source: int = 0


def parse_hh(text: str, where: str, key: str) -> Messages:
    """An HH-RLHF transcript string ("\\n\\nHuman: hi\\n\\nAssistant: hello") as messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise TunekitError(f"{where}: field '{key}' is not a 'Human: ... Assistant: ...' transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _turns(value: Any, key: str, where: str, fmt: str, default_role: str) -> Messages:
    if isinstance(value, list):
        return _check_messages(value, key, where, fmt)
    text = _text(value, key, where, fmt)
    if _HH_TURN.match(text):
        return parse_hh(text, where, key)
    return [{"role": default_role, "content": text}]


def _split_last_answer(msgs: Messages, key: str, where: str) -> tuple[Messages, Messages]:
    last = max((i for i, m in enumerate(msgs) if m["role"] != "assistant"), default=-1)
    if last == len(msgs) - 1 or last < 0:
        raise TunekitError(f"{where}: '{key}' must end with an assistant turn after a prompt")
    return msgs[: last + 1], msgs[last + 1 :]


MARGIN_LIMIT = 1e4


def _margin(rec: dict[str, Any], where: str) -> float | None:
    value = rec.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TunekitError(f"{where}: field 'margin' must be a finite number, got {value!r}")
    # the loss −log σ(Δr − m) is computed in the model's float32/bf16: |m| of 10^38 or more overflows to inf, and
    # any |m| past a few hundred already saturates σ; MARGIN_LIMIT keeps the loss finite with room to spare
    if abs(value) > MARGIN_LIMIT:
        raise TunekitError(f"{where}: field 'margin' = {value!r} is beyond ±{MARGIN_LIMIT:g} (the loss would "
                           "overflow; margins are reward differences, typically 0 to 10)")
    return float(value)


def detect_preference_format(rec: dict[str, Any], where: str) -> str:
    if "chosen" in rec and "rejected" in rec:
        return "preference" if "prompt" in rec else "preference_transcript"
    keys = ", ".join(sorted(rec)) or "none"
    raise TunekitError(f"{where}: not a preference record (fields: {keys}); expected prompt/chosen/rejected or "
                       "chosen/rejected transcripts")


def to_preference(rec: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> PreferencePair:
    """One canonical pair; an error naming `where` if the record is not one."""
    name = detect_preference_format(rec, where) if fmt == "auto" else fmt
    if name not in ("preference", "preference_transcript"):
        raise TunekitError(f"{where}: data format '{name}' is not a preference format (preference, "
                           "preference_transcript)")
    for key in ("chosen", "rejected") + (("prompt",) if name == "preference" else ()):
        if rec.get(key) is None:
            raise TunekitError(f"{where}: missing field '{key}' ({name} format)")
    chosen = _turns(rec["chosen"], "chosen", where, name, "assistant")
    rejected = _turns(rec["rejected"], "rejected", where, name, "assistant")
    transcripts = any(m["role"] != "assistant" for m in chosen + rejected)
    if transcripts or name == "preference_transcript":
        prompt_c, chosen = _split_last_answer(chosen, "chosen", where)
        prompt_r, rejected = _split_last_answer(rejected, "rejected", where)
        if prompt_c != prompt_r:
            raise TunekitError(f"{where}: 'chosen' and 'rejected' do not share a prompt (they differ before the "
                               "last assistant turn)")
        prompt = prompt_c
        if name == "preference" and rec.get("prompt") is not None:
            given = _turns(rec["prompt"], "prompt", where, name, "user")
            if prompt[-len(given):] != given:
                raise TunekitError(f"{where}: 'prompt' differs from the prompt inside 'chosen'/'rejected'")
    else:
        prompt = _turns(rec["prompt"], "prompt", where, name, "user")
        if prompt[-1]["role"] == "assistant":
            raise TunekitError(f"{where}: 'prompt' must end with a user (or system/tool) turn, not the assistant")
    if chosen == rejected:
        raise TunekitError(f"{where}: 'chosen' and 'rejected' are identical")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return PreferencePair(prompt, chosen, rejected, _margin(rec, where), where)


def to_feedback(rec: dict[str, Any], fmt: str, where: str,
                system_prompt: str | None = None) -> FeedbackRecord | PreferencePair:
    """An unpaired record {prompt, completion, label: true|false}, or a preference pair (split later by
    `unpair`, after the train/eval split, so both halves of a pair land on the same side)."""
    name = fmt
    if fmt == "auto":
        if "label" in rec or ("completion" in rec and "chosen" not in rec):
            name = "unpaired"
        elif "chosen" in rec and "rejected" in rec:
            name = "preference" if "prompt" in rec else "preference_transcript"
        else:
            keys = ", ".join(sorted(rec)) or "none"
            raise TunekitError(f"{where}: not a feedback record (fields: {keys}); expected prompt/completion/label "
                               "(label true or false) or prompt/chosen/rejected pairs")
    if name in ("preference", "preference_transcript"):
        return to_preference(rec, name, where, system_prompt)
    if name != "unpaired":
        raise TunekitError(f"{where}: data format '{name}' is not a feedback format (unpaired, preference, "
                           "preference_transcript)")
    for key in ("prompt", "completion", "label"):
        if rec.get(key) is None:
            raise TunekitError(f"{where}: missing field '{key}' (unpaired format: prompt, completion, label)")
    label = rec["label"]
    if not isinstance(label, bool):
        raise TunekitError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    prompt = _turns(rec["prompt"], "prompt", where, name, "user")
    if prompt[-1]["role"] == "assistant":
        raise TunekitError(f"{where}: 'prompt' must end with a user (or system/tool) turn, not the assistant")
    completion = _turns(rec["completion"], "completion", where, name, "assistant")
    if any(m["role"] != "assistant" for m in completion):
        raise TunekitError(f"{where}: 'completion' must hold only assistant turns")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return FeedbackRecord(prompt, completion, label, where)


def unpair(items: list[FeedbackRecord | PreferencePair]) -> list[FeedbackRecord]:
    """Each pair as one desirable (chosen) and one undesirable (rejected) record; unpaired records as they are."""
    out: list[FeedbackRecord] = []
    for it in items:
        if isinstance(it, PreferencePair):
            out.append(FeedbackRecord(it.prompt, it.chosen, True, it.where, it.source))
            out.append(FeedbackRecord(it.prompt, it.rejected, False, it.where, it.source))
        else:
            out.append(it)
    return out


def to_prompt(rec: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> PromptRecord:
    """A prompt for RL and the record's other columns. A `messages` record ending with an assistant turn
    keeps that turn as the `reference` column."""
    columns = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _turns(rec["prompt"], "prompt", where, "prompt", "user")
    elif "messages" in rec:
        prompt = _check_messages(rec["messages"], "messages", where, "prompt")
        if prompt[-1]["role"] == "assistant":
            columns.setdefault("reference", prompt[-1]["content"])
            prompt = prompt[:-1]
    elif "question" in rec and isinstance(rec["question"], str):  # GSM8K-style
        prompt = [{"role": "user", "content": rec["question"]}]
        columns.pop("question")
    else:
        keys = ", ".join(sorted(rec)) or "none"
        raise TunekitError(f"{where}: no prompt in the record (fields: {keys}); expected 'prompt' or 'messages'")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise TunekitError(f"{where}: the prompt must end with a user turn")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return PromptRecord(prompt, columns, where)


@dataclass
class Split:
    train: list[Any]
    eval: list[Any]
    sources: list[dict[str, Any]] = field(default_factory=list)


def _read(cfg: DataConfig, which: str, convert) -> list[Any]:
    spec = cfg.train if which == "train" else cfg.eval
    out = []
    for i, src in enumerate(as_sources(spec, cfg.format)):
        preset = HUB_PRESETS.get(src.path, {})
        split = src.split if src.split != "train" or not preset else preset["split"]
        fmt = src.format if src.format not in (None, "auto") else preset.get("format", "auto")
        records = read_source(src.path, split=split, name=src.name or preset.get("name"))
        if not records:
            raise TunekitError(f"data source '{src.path}' is empty")
        for rec in records:
            item = convert(rec.data, fmt, rec.where, cfg.system_prompt)
            item.source = i
            out.append(item)
    return out


def split_records(cfg: DataConfig, seed: int, convert) -> Split:
    """Read train (and eval) sources with `convert`; carve eval off train when `data.eval` is unset; weights."""
    seed = cfg.seed if cfg.seed is not None else seed
    rng = random.Random(seed)
    sources = as_sources(cfg.train, cfg.format)
    if not sources:
        raise TunekitError("data.train is not set: give a file, folder or hub dataset id")
    items = _read(cfg, "train", convert)
    if cfg.eval is not None:
        held = _read(cfg, "eval", convert)
        held = held[: cfg.max_eval_samples] if cfg.max_eval_samples else held
    else:
        order = list(range(len(items)))
        rng.shuffle(order)
        k = eval_count(len(items), cfg.eval_split, cfg.max_eval_samples)
        chosen = set(order[:k])
        held = [items[i] for i in sorted(chosen)]
        items = [x for i, x in enumerate(items) if i not in chosen]
    train = apply_weights(items, sources, rng)
    rng.shuffle(train)
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    used = [{"path": s.path, "weight": s.weight, "used": sum(x.source == i for x in train)}
            for i, s in enumerate(sources)]
    return Split(train, held, used)


def fingerprint_rows(*groups: list[dict[str, Any]]) -> str:
    import hashlib
    import json

    h = hashlib.sha256()
    for group in groups:
        for row in group:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]
