"""The prompt set of a CAI run: a jsonl of `{"prompt": str | [messages], "id": optional}` records.

Each prompt has a stable id (the record's `id`, else a hash of the prompt), which is what resuming keys on.
The shipped set (tunekit/assets/cai/) is red-team style but benign, with a held-out split for evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str | Messages  # as written in the file

    @property
    def messages(self) -> Messages:
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)


def shipped_prompts(split: str = "train") -> Path:
    name = {"train": "prompts.jsonl", "heldout": "prompts_heldout.jsonl"}[split]
    return Path(str(resources.files("tunekit") / "assets" / "cai" / name))


def _check(value: Any, where: str) -> str | Messages:
    if isinstance(value, str):
        if not value.strip():
            raise TunekitError(f"{where}: field 'prompt' is empty")
        return value
    if not isinstance(value, list) or not value:
        raise TunekitError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
            m.get("content"), str
        ):
            raise TunekitError(f"{where}: prompt[{i}] must be {{role: system|user|assistant, content: str}}")
    if value[-1]["role"] != "user":
        raise TunekitError(f"{where}: the last message of 'prompt' must be a user turn")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Read a prompt jsonl (None = the shipped train split); errors name the file and line."""
    path = Path(path).expanduser() if path is not None else shipped_prompts("train")
    if not path.is_file():
        raise TunekitError(f"prompt file '{path}' not found")
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunekitError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise TunekitError(f"{where}: missing field 'prompt'")
        prompt = _check(rec["prompt"], where)
        pid = rec.get("id")
        if pid is None:
            pid = hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]
        pid = str(pid)
        if pid in seen:
            raise TunekitError(f"{where}: duplicate prompt id '{pid}' (first on line {seen[pid]})")
        seen[pid] = n
        out.append(Prompt(pid, prompt))
    if not out:
        raise TunekitError(f"{path}: no prompts")
    return out[:limit] if limit else out
