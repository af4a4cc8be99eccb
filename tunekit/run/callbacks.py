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
        if state.is_world_process_zero:
            self._drop_rows_after(state.global_step)

    def _drop_rows_after(self, step: int) -> None:
        """On --resume from checkpoint-N, rows logged after step N by the interrupted run (and its end-of-training
        summary row) are logged again by this one: keep only what the checkpoint had seen, so no step appears
        twice."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(row, dict) and row.get("step", 0) <= step and "train_runtime" not in row:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)

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


def _non_finite(tensors: Any) -> bool:
    import torch

    return any(not bool(torch.isfinite(t).all()) for t in tensors)


class FiniteGuardCallback(TrainerCallback):
    """Stop at the first non-finite loss or gradient, before the optimizer applies it, and at the first
    non-finite trainable weight, before a checkpoint of it is saved: the last checkpoint stays the last good one.

    A NaN/inf loss makes every gradient NaN/inf, so checking the gradients (after clipping, before
    `optimizer.step()`) catches both; the Trainer itself only hides a NaN loss from its logs
    (`logging_nan_inf_filter`) and keeps training.
    """

    def __init__(self, run_path: Path | None = None):
        self.run_path = run_path

    def _stop(self, state, what: str) -> None:
        from tunekit.errors import NumericalError

        last = None
        if self.run_path is not None and (self.run_path / "checkpoints").is_dir():
            found = sorted((self.run_path / "checkpoints").glob("checkpoint-*"),
                           key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else -1)
            last = found[-1] if found else None
        kept = (f"the last good checkpoint is {last}; lower train.lr and continue with --resume" if last else
                "no checkpoint was saved before it; lower train.lr (or check the data and the model's weights)")
        raise NumericalError(f"training stopped at step {state.global_step + 1}: {what}; {kept}")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and _non_finite(grads):
            self._stop(state, "non-finite loss or gradient (nan/inf)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        weights = [p.detach() for p in model.parameters() if p.requires_grad]
        if weights and _non_finite(weights):
            state.global_step -= 1  # name the step that produced them
            self._stop(state, "the update made trainable weights non-finite (nan/inf)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._stop(state, f"non-finite {key} ({value})")
