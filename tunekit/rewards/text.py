"""Completions and prompts as TRL hands them to reward functions: plain strings or lists of chat messages."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text to score: the string itself, or the content of the assistant messages of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        parts = [_content(m.get("content")) for m in completion if isinstance(m, dict) and m.get("role", "assistant")
                 == "assistant"]
        return "\n".join(parts)
    return "" if completion is None else str(completion)


def _content(content: Any) -> str:
    """A message's content: a string, or TRL/OpenAI-style content parts [{type: text, text: ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else str(content)


def as_messages(prompt: Any, completion: Any) -> list[dict[str, str]]:
    """One conversation from a prompt (string or messages) and a completion (string or messages)."""
    messages: list[dict[str, str]] = []
    if isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, (list, tuple)):
        messages += [{"role": m["role"], "content": _content(m.get("content"))} for m in prompt]
    if isinstance(completion, (list, tuple)):
        messages += [{"role": m.get("role", "assistant"), "content": _content(m.get("content"))} for m in completion]
    else:
        messages.append({"role": "assistant", "content": completion_text(completion)})
    return messages
