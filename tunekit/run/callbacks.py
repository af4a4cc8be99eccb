"""Trainer callbacks: a live progress bar (loss, tokens/s, ETA) and metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunekit.console import console


class MetricsCallback(TrainerCallback):
    """Append every log event (train and eval) to metrics.jsonl, with tokens/s and padding share."""

    def __init__(self, path: Path, collator: Any = None):
        self.path = path
        self.collator = collator
        self._t0 = None
        self._tokens0 = 0
        self.loop_seconds: float | None = None  # on_train_begin → on_train_end, for the run card
        self.loop_tokens = 0

    def on_train_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.loop_seconds = time.perf_counter() - self._t0
            self.loop_tokens = getattr(self.collator, "real_tokens", 0) - self._tokens0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._tokens0 = getattr(self.collator, "real_tokens", 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row: dict[str, Any] = {"step": state.global_step, **{k: v for k, v in logs.items()}}
        if self.collator is not None and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            tokens = self.collator.real_tokens - self._tokens0
            row["tokens_seen"] = tokens
            row["tokens_per_s"] = round(tokens / elapsed, 2) if elapsed > 0 else None
            row["padding_share"] = round(self.collator.padding_share, 4)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


class ProgressCallback(TrainerCallback):
    """Rich progress bar: step/total, loss, tokens/s, ETA. Replaces the Trainer's tqdm bars."""

    def __init__(self, collator: Any = None):
        self.collator = collator
        self.progress = None
        self.task = None
        self._t0 = 0.0
        self._tokens0 = 0
        self._loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
        self._t0 = time.perf_counter()
        self._tokens0 = getattr(self.collator, "real_tokens", 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        parts = []
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self.collator is not None and elapsed > 0:
            parts.append(f"{(self.collator.real_tokens - self._tokens0) / elapsed:,.0f} tok/s")
        self.progress.update(self.task, completed=state.global_step, info="  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
