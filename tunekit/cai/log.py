"""An append-only jsonl keyed by prompt id, safe to kill at any moment and resume.

Each record is one `write` of a whole line followed by flush + fsync. A run killed mid-write leaves at most a
partial last line; opening the log again cuts it off, so the prompt it belonged to is simply redone. Finished
ids are never redone, and an id is never written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class AppendLog:
    def __init__(self, path: str | Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        self.repaired = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good = 0  # byte offset after the last complete, valid line
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.records.setdefault(str(rec[self.key]), rec)
            good += len(line)
        if good != len(raw):  # a torn last line from a killed run: drop it, that prompt is redone
            with self.path.open("r+b") as fh:
                fh.truncate(good)
            self.repaired = True

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for rec in records:
                k = str(rec[self.key])
                if k in self.records:
                    continue
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                self.records[k] = rec

    def in_order(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        return [self.records[i] for i in ids if i in self.records]
