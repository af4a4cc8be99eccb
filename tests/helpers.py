"""Test helpers: run the real CLI in a subprocess, write small datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m tunekit ARGS` in a fresh process (the way users run it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "tunekit", *map(str, args)],
        cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [
    {"instruction": "Say hello.", "output": "Hello!"},
    {"instruction": "Add 2 and 3.", "output": "5"},
    {"instruction": "Capital of France?", "output": "Paris."},
    {"instruction": "Translate good morning to French.", "output": "Bonjour."},
    {"instruction": "Yes or no?", "output": "Yes."},
    {"instruction": "Count to three.", "output": "1 2 3"},
    {"instruction": "Say bye.", "output": "Bye!"},
    {"instruction": "Opposite of up?", "output": "Down."},
    {"instruction": "Numbers from one to five.", "output": "1 2 3 4 5"},
    {"instruction": "Summarize: the quick brown fox jumps.", "output": "A fox jumps."},
]
