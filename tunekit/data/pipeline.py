"""From `data` recipe section to tokenized train/eval datasets, with counts for the log and the run card.

Order: read every source → normalise to messages (errors name file:line) → carve the eval split from the
unique records → apply source weights to the rest → shuffle → tokenize (assistant mask, truncate/drop) → pack.
Weights multiply a source: 2.0 repeats every record twice, 0.5 samples half of them (seeded).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunekit.config.schema import DataConfig, DataSource
from tunekit.data.formats import to_messages
from tunekit.data.sources import read_source
from tunekit.data.templates import tokenize_conversation
from tunekit.errors import TunekitError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


def as_sources(spec: str | list[DataSource] | None, default_format: str) -> list[DataSource]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [DataSource(path=spec, format=default_format)]
    return [s if s.format else s.model_copy(update={"format": default_format}) for s in spec]


@dataclass
class Example:
    messages: list[dict[str, str]]
    where: str
    source: int


def load_examples(sources: list[DataSource], system_prompt: str | None = None) -> list[Example]:
    out = []
    for i, src in enumerate(sources):
        records = read_source(src.path, split=src.split, name=src.name)
        if not records:
            raise TunekitError(f"data source '{src.path}' is empty")
        for rec in records:
            out.append(Example(to_messages(rec.data, src.format or "auto", rec.where, system_prompt), rec.where, i))
    return out


def apply_weights(examples: list[Example], sources: list[DataSource], rng: random.Random) -> list[Example]:
    """Repeat each source floor(w) times and sample the fractional part without replacement."""
    out: list[Example] = []
    for i, src in enumerate(sources):
        own = [e for e in examples if e.source == i]
        whole, frac = int(math.floor(src.weight)), src.weight - math.floor(src.weight)
        out.extend(own * whole)
        out.extend(rng.sample(own, round(frac * len(own))))
    return out


def fingerprint(*groups: list[Example]) -> str:
    h = hashlib.sha256()
    for group in groups:
        for ex in group:
            h.update(json.dumps(ex.messages, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


@dataclass
class DataStats:
    sources: list[dict[str, Any]] = field(default_factory=list)
    train_records: int = 0
    eval_records: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    train_tokens: int = 0
    target_tokens: int = 0
    packed_rows: int | None = None
    fingerprint: str = ""

    def summary(self) -> str:
        src = ", ".join(f"{s['path']} x{s['weight']:g} -> {s['used']}" for s in self.sources)
        line = f"data: {self.train_records} train / {self.eval_records} eval records ({src}); "
        line += f"{self.train_tokens} tokens, {self.target_tokens} in the loss; "
        line += f"truncated {self.truncated}, dropped {self.dropped_too_long} too long"
        line += f" + {self.dropped_no_target} with no target tokens"
        if self.packed_rows is not None:
            line += f"; packed into {self.packed_rows} rows"
        return line


@dataclass
class SFTData:
    train: Dataset
    eval: Dataset | None
    stats: DataStats
    eval_messages: list[list[dict[str, str]]]


def _tokenize_all(examples: list[Example], tok, cfg: DataConfig, stats: DataStats | None) -> Dataset:
    from datasets import Dataset

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for ex in examples:
        t = tokenize_conversation(tok, ex.messages, cfg.max_length, cfg.train_on, cfg.truncation)
        if t.dropped:
            if stats is not None:
                stats.dropped_too_long += t.dropped == "too_long"
                stats.dropped_no_target += t.dropped == "no_target"
            continue
        if stats is not None:
            stats.truncated += int(t.truncated)
            stats.train_tokens += len(t.input_ids)
            stats.target_tokens += sum(1 for label in t.labels[1:] if label != -100)
        rows["input_ids"].append(t.input_ids)
        rows["labels"].append(t.labels)
    return Dataset.from_dict(rows)


def eval_count(n: int, split: float, cap: int | None) -> int:
    if split <= 0 or n < 2:
        return 0
    k = int(split) if split >= 1 else max(1, round(split * n))
    k = min(k, n - 1)
    return min(k, cap) if cap else k


def build_sft_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, seed: int) -> SFTData:
    """Tokenized train (and eval) datasets for supervised fine-tuning."""
    seed = cfg.seed if cfg.seed is not None else seed
    rng = random.Random(seed)
    train_sources = as_sources(cfg.train, cfg.format)
    if not train_sources:
        raise TunekitError("data.train is not set: give a file, folder or hub dataset id")
    examples = load_examples(train_sources, cfg.system_prompt)
    eval_sources = as_sources(cfg.eval, cfg.format)
    if eval_sources:
        eval_examples = load_examples(eval_sources, cfg.system_prompt)
        if cfg.max_eval_samples:
            eval_examples = eval_examples[: cfg.max_eval_samples]
    else:
        order = list(range(len(examples)))
        rng.shuffle(order)
        k = eval_count(len(examples), cfg.eval_split, cfg.max_eval_samples)
        held = set(order[:k])
        eval_examples = [examples[i] for i in sorted(held)]
        examples = [e for i, e in enumerate(examples) if i not in held]
    train = apply_weights(examples, train_sources, rng)
    rng.shuffle(train)
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    stats = DataStats(fingerprint=fingerprint(train, eval_examples))
    for i, src in enumerate(train_sources):
        stats.sources.append({"path": src.path, "weight": src.weight, "used": sum(e.source == i for e in train)})
    train_ds = _tokenize_all(train, tok, cfg, stats)
    if len(train_ds) == 0:
        raise TunekitError("no training example is left after tokenization (all too long or without answers)")
    stats.train_records = len(train_ds)
    eval_ds = _tokenize_all(eval_examples, tok, cfg, None) if eval_examples else None
    stats.eval_records = len(eval_ds) if eval_ds is not None else 0
    if cfg.packing:
        from trl.data_utils import pack_dataset

        train_ds = pack_dataset(train_ds, seq_length=cfg.max_length, strategy="bfd")
        stats.packed_rows = len(train_ds)
    return SFTData(train_ds, eval_ds, stats, [e.messages for e in eval_examples])
