"""Normalise instruction records to canonical `messages` ([{role, content}, ...]).

| format            | fields                                                     |
|-------------------|------------------------------------------------------------|
| alpaca            | instruction, input (optional), output, system (optional)   |
| prompt_completion | prompt, completion (strings or message lists)              |
| messages          | messages: [{role, content}]                                |
| sharegpt          | conversations: [{from, value}] (human/gpt/system/...)      |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunekit.errors import TunekitError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bing": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


def _field(rec: dict[str, Any], key: str, where: str, fmt: str, optional: bool = False) -> Any:
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise TunekitError(f"{where}: missing field '{key}' ({fmt} format)")
    return rec[key]


def _text(value: Any, key: str, where: str, fmt: str) -> str:
    if not isinstance(value, str):
        raise TunekitError(f"{where}: field '{key}' must be a string, got {type(value).__name__} ({fmt} format)")
    return value


def _check_messages(msgs: Any, key: str, where: str, fmt: str) -> Messages:
    if not isinstance(msgs, list) or not msgs:
        raise TunekitError(f"{where}: field '{key}' must be a non-empty list of messages ({fmt} format)")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise TunekitError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TunekitError(f"{where}: {key}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TunekitError(f"{where}: {key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def from_alpaca(rec: dict[str, Any], where: str) -> Messages:
    instruction = _text(_field(rec, "instruction", where, "alpaca"), "instruction", where, "alpaca")
    extra = _field(rec, "input", where, "alpaca", optional=True)
    output = _text(_field(rec, "output", where, "alpaca"), "output", where, "alpaca")
    user = instruction if not extra else f"{instruction}\n\n{_text(extra, 'input', where, 'alpaca')}"
    msgs: Messages = []
    system = rec.get("system")
    if system:
        msgs.append({"role": "system", "content": _text(system, "system", where, "alpaca")})
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def from_prompt_completion(rec: dict[str, Any], where: str) -> Messages:
    fmt = "prompt_completion"
    prompt, completion = _field(rec, "prompt", where, fmt), _field(rec, "completion", where, fmt)
    if isinstance(prompt, list):
        head = _check_messages(prompt, "prompt", where, fmt)
    else:
        head = [{"role": "user", "content": _text(prompt, "prompt", where, fmt)}]
    if isinstance(completion, list):
        tail = _check_messages(completion, "completion", where, fmt)
    else:
        tail = [{"role": "assistant", "content": _text(completion, "completion", where, fmt)}]
    return head + tail


def from_messages(rec: dict[str, Any], where: str) -> Messages:
    return _check_messages(_field(rec, "messages", where, "messages"), "messages", where, "messages")


def from_sharegpt(rec: dict[str, Any], where: str) -> Messages:
    convs = _field(rec, "conversations", where, "sharegpt")
    if not isinstance(convs, list) or not convs:
        raise TunekitError(f"{where}: field 'conversations' must be a non-empty list (sharegpt format)")
    out = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TunekitError(f"{where}: conversations[{i}] must have 'from' and 'value' (sharegpt format)")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise TunekitError(f"{where}: conversations[{i}].from {turn['from']!r} is not a known speaker")
        out.append({"role": role, "content": _text(turn["value"], f"conversations[{i}].value", where, "sharegpt")})
    return out


NORMALISERS: dict[str, Callable[[dict[str, Any], str], Messages]] = {
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
}


def detect_format(rec: dict[str, Any], where: str) -> str:
    """Pick the format from the record's keys."""
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    keys = ", ".join(sorted(rec)) or "none"
    raise TunekitError(
        f"{where}: cannot tell the record format from its fields ({keys}); expected messages, conversations, "
        "instruction/output or prompt/completion (or set data.format)"
    )


def to_messages(rec: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> Messages:
    """Canonical messages for one record; the conversation must contain at least one assistant turn."""
    name = detect_format(rec, where) if fmt == "auto" else fmt
    if name not in NORMALISERS:  # a preference / prompt / unpaired format, read by the other stages
        raise TunekitError(f"{where}: data format '{name}' is not a conversation format for this stage "
                           f"({', '.join(NORMALISERS)}, auto)")
    msgs = NORMALISERS[name](rec, where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise TunekitError(f"{where}: the conversation has no assistant message to learn from")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs
