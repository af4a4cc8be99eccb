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


def interrupt_after_checkpoint(cli_args: list[str], out: Path, timeout: float = 900) -> int:
    """Start `tunekit CLI_ARGS --output OUT`, SIGKILL it once its first checkpoint is complete; return that
    checkpoint's step (the run is left at OUT.partial, as after a crash)."""
    import signal
    import time

    args = [sys.executable, "-m", "tunekit", *map(str, cli_args), "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpts = out.with_name(out.name + ".partial") / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a hard kill: no clean-up code runs
    proc.wait()
    assert not out.exists()
    done = sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob("checkpoint-*/trainer_state.json"))
    assert done, "no checkpoint was written before the kill"
    return done[-1]


def share_of_e(completions, **_columns) -> list[float]:
    """A toy reward for RL tests: the share of the letter 'e' in each completion (`python:tests.helpers:share_of_e`)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]
