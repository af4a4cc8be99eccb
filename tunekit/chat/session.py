"""The conversation loop of `tunekit chat`: history, slash commands, streaming, Ctrl-C, `--compare`.

Interactive on a terminal (readline line editing and a history file); otherwise each `--prompt` or each stdin
line (plain text, a JSON string, or a JSON list of messages) is answered once and the program exits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tunekit.chat.backends import Backend, GenParams, Messages
from tunekit.errors import TunekitError

HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (empty: none) and start over
  /save FILE      append the conversation to FILE as a `messages` record (trainable with tunekit sft)
  /load FILE      continue a saved conversation (the last record of a .jsonl file, or a .json file)
  /params [K=V]   show or set temperature, top_p, max_new_tokens, seed
  /exit           leave (also Ctrl-D); Ctrl-C stops the current answer
"""
SIDE_BY_SIDE_MIN_WIDTH = 100


@dataclass
class Conversation:
    """One target's history; `system` is prepended when set."""

    backend: Backend
    system: str | None = None
    turns: Messages = field(default_factory=list)

    def messages(self, user: str | None = None) -> Messages:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + list(self.turns)
        return msgs + ([{"role": "user", "content": user}] if user is not None else [])


def history_file() -> Path:
    root = Path(os.environ.get("TUNEKIT_CACHE_DIR", Path.home() / ".cache" / "tunekit"))
    return root / "chat_history"


def _setup_readline() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # no readline on this platform: plain input()
        return
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            readline.read_history_file(str(path))
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(str(path))
    except OSError:
        pass


def load_conversation(path: str | Path) -> Messages:
    """Messages of a saved conversation: a .json file, or the last record of a .jsonl file, in any format
    tunekit trains on (messages, sharegpt, alpaca, prompt/completion)."""
    from tunekit.data.formats import to_messages

    path = Path(path).expanduser()
    if not path.is_file():
        raise TunekitError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise TunekitError(f"{path}: empty")
    line_no, raw = (1, text) if path.suffix == ".json" else lines[-1]
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TunekitError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict):
        raise TunekitError(f"{path}:{line_no}: expected a JSON object with messages")
    return to_messages(record, "auto", f"{path}:{line_no}")


def save_conversation(path: str | Path, messages: Messages) -> Path:
    """Append `{"messages": [...]}` as one JSON line."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise TunekitError(f"{path} is a folder")
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


class ChatSession:
    """Talks to one target (or two with `--compare`) and keeps each one's history."""

    def __init__(self, backends: list[Backend], params: GenParams, system: str | None = None,
                 out: TextIO | None = None) -> None:
        self.convs = [Conversation(b, system) for b in backends]
        self.params = params
        self.out = out or sys.stdout
        if params.seed is not None:
            self._seed(params.seed)

    # ------------------------------------------------------------------------------------ answering
    @staticmethod
    def _seed(seed: int) -> None:
        import random

        random.seed(seed)
        try:
            import torch

            torch.manual_seed(seed)
        except ImportError:
            pass

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _stream(self, conv: Conversation, user: str, show: bool) -> tuple[str, bool]:
        """(answer, finished): generate for `conv`, printing pieces when `show`; Ctrl-C stops it."""
        stop = threading.Event()
        pieces: list[str] = []
        try:
            for piece in conv.backend.stream(conv.messages(user), self.params, stop):
                if show:
                    self._write(piece)
                pieces.append(piece)
        except KeyboardInterrupt:
            stop.set()
            return "".join(pieces).strip(), False
        return "".join(pieces).strip(), True

    def ask(self, user: str, show: bool = True) -> list[str] | None:
        """Answer `user` with every target; None when interrupted (the turn is not kept)."""
        multi = len(self.convs) > 1
        side = multi and show and shutil.get_terminal_size((80, 24)).columns >= SIDE_BY_SIDE_MIN_WIDTH
        answers: list[str] = []
        for i, conv in enumerate(self.convs):
            if multi and show and not side:
                self._write(f"[{'AB'[i]}: {conv.backend.name}]\n")
            elif side:
                self._write(f"[{'AB'[i]}: generating...]\n")
            answer, finished = self._stream(conv, user, show and not side)
            if show and not side:
                self._write("\n")
            if not finished:
                self._write("[stopped]\n")
                return None
            answers.append(answer)
        for conv, answer in zip(self.convs, answers):
            conv.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if side:
            self._side_by_side(answers)
        return answers

    def _side_by_side(self, answers: list[str]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=False, expand=True)
        for i, conv in enumerate(self.convs):
            table.add_column(f"{'AB'[i]}: {conv.backend.name}", overflow="fold", ratio=1)
        table.add_row(*answers)
        Console(file=self.out, width=shutil.get_terminal_size((120, 24)).columns).print(table)

    # ------------------------------------------------------------------------------------ commands
    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            for conv in self.convs:
                conv.turns = []
            self._write("(conversation reset)\n")
        elif name == "/system":
            for conv in self.convs:
                conv.system, conv.turns = (arg or None), []
            self._write(f"(system message {'set' if arg else 'cleared'}; conversation reset)\n")
        elif name == "/save":
            if not arg:
                raise TunekitError("/save needs a file name")
            path = save_conversation(arg, self.convs[0].messages())
            self._write(f"(saved {len(self.convs[0].turns) // 2} turns to {path})\n")
        elif name == "/load":
            if not arg:
                raise TunekitError("/load needs a file name")
            messages = load_conversation(arg)
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
            for conv in self.convs:
                conv.system = system
                conv.turns = [m for m in messages if m["role"] != "system"]
            self._write(f"(loaded {len(messages)} messages from {arg})\n")
        elif name == "/params":
            for pair in arg.split():
                key, eq, value = pair.partition("=")
                if not eq:
                    raise TunekitError(f"/params: expected KEY=VALUE, got '{pair}'")
                self.params.set(key, value)
                if key == "seed" and self.params.seed is not None:
                    self._seed(self.params.seed)
            self._write(" ".join(f"{k}={v}" for k, v in self.params.as_dict().items()) + "\n")
        elif name in ("/help", "/?"):
            self._write(HELP)
        else:
            self._write(f"unknown command {name}; /help lists them\n")
        return True

    # ------------------------------------------------------------------------------------ loops
    def interactive(self) -> None:
        _setup_readline()
        names = " vs ".join(c.backend.name for c in self.convs)
        self._write(f"chatting with {names}; /help for commands, /exit or Ctrl-D to leave\n")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                self._write("\n")
                return
            except KeyboardInterrupt:
                self._write("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves)\n")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                try:
                    if not self.command(line):
                        return
                except TunekitError as exc:
                    self._write(f"error: {exc}\n")
                continue
            try:
                self.ask(line)
            except TunekitError as exc:
                self._write(f"error: {exc}\n")

    def batch(self, prompts: list[Messages], as_json: bool = False) -> None:
        """Answer each message list on its own (no shared history) and print the answers."""
        for messages in prompts:
            answers = []
            for conv in self.convs:
                msgs = messages if messages[0]["role"] == "system" or not conv.system else \
                    [{"role": "system", "content": conv.system}, *messages]
                t0 = time.perf_counter()
                answers.append((conv.backend.answer(msgs, self.params), time.perf_counter() - t0))
            if as_json:
                record: dict[str, Any] = {"messages": messages, "answer": answers[0][0]}
                if len(answers) > 1:
                    record["compare"] = answers[1][0]
                self._write(json.dumps(record, ensure_ascii=False) + "\n")
            elif len(answers) == 1:
                self._write(answers[0][0] + "\n")
            else:
                for i, (conv, (text, _)) in enumerate(zip(self.convs, answers)):
                    self._write(f"[{'AB'[i]}: {conv.backend.name}]\n{text}\n")


def read_prompts(stream: TextIO) -> list[Messages]:
    """Prompts from stdin: one per line, plain text or a JSON string (one user turn) or a JSON list of
    messages (a whole conversation to continue)."""
    prompts: list[Messages] = []
    for n, line in enumerate(stream, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        value: Any = line
        if line.lstrip().startswith(("[", '"', "{")):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunekitError(f"<stdin>:{n}: not JSON ({exc.msg})") from None
        if isinstance(value, dict):
            value = value.get("messages", value)
        if isinstance(value, str):
            prompts.append([{"role": "user", "content": value}])
        elif isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            prompts.append([{"role": m["role"], "content": m["content"]} for m in value])
        else:
            raise TunekitError(f"<stdin>:{n}: expected text, a JSON string or a list of {{role, content}} messages")
    return prompts
