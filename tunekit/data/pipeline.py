"""From `data` recipe section to tokenized train/eval datasets, with counts for the log and the run card.

Order: stream every source → normalise each record to messages (errors name file:line) into an Arrow file on
disk → carve the eval split from the unique records → apply source weights to the rest → shuffle → tokenize
(assistant mask, truncate/drop; `datasets.map` over batches, on all cores for large data) → pack.
Weights multiply a source: 2.0 repeats every record twice, 0.5 samples half of them (seeded).

Memory stays flat in the record count: records never sit in Python lists (only index arrays do); the Arrow files
are memory-mapped. The result is cached under `$TUNEKIT_CACHE_DIR/data/<key>/`, keyed by the data files (path,
size, modification time) or hub ids, the `data` section, the seed, the chat template and the tokenizer, so a
second run with the same inputs, or `--resume`, reads it back instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.config.schema import DataConfig, DataSource
from tunekit.console import console
from tunekit.data.formats import to_messages
from tunekit.data.sources import iter_source, source_files
from tunekit.data.templates import tokenize_conversations
from tunekit.errors import TunekitError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = "sft-data-1"  # bump when the cached layout or the tokenization changes
WRITE_BATCH = 4096  # normalised records per Arrow record batch
PROGRESS_EVERY = 50_000  # records between progress lines while reading


def as_sources(spec: str | list[DataSource] | None, default_format: str) -> list[DataSource]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [DataSource(path=spec, format=default_format)]
    return [s if s.format else s.model_copy(update={"format": default_format}) for s in spec]


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
    cached: bool = False  # read back from the tokenization cache


# ---- reading -----------------------------------------------------------------------------------------------


def _normalise_to_arrow(sources: list[DataSource], system_prompt: str | None, path: Path, what: str):
    """Stream every record of `sources` into an Arrow file (columns messages (JSON), where, source).

    Returns (Dataset memory-mapped from the file, sha256 of the normalised records in order).
    """
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema([("messages", pa.string()), ("where", pa.string()), ("source", pa.int32())])
    digest = hashlib.sha256()
    cols: dict[str, list] = {"messages": [], "where": [], "source": []}
    n, started = 0, time.perf_counter()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:

        def flush() -> None:
            writer.write_batch(pa.record_batch([pa.array(cols[k], type=schema.field(k).type) for k in cols],
                                               schema=schema))
            for v in cols.values():
                v.clear()

        for i, src in enumerate(sources):
            before = n
            for rec in iter_source(src.path, split=src.split, name=src.name):
                msgs = json.dumps(to_messages(rec.data, src.format or "auto", rec.where, system_prompt),
                                  ensure_ascii=False)
                digest.update(msgs.encode())
                cols["messages"].append(msgs)
                cols["where"].append(rec.where)
                cols["source"].append(i)
                n += 1
                if len(cols["messages"]) >= WRITE_BATCH:
                    flush()
                if n % PROGRESS_EVERY == 0:
                    console.print(f"reading {what}: {n:,} records ({n / (time.perf_counter() - started):,.0f}/s)")
            if n == before:
                raise TunekitError(f"data source '{src.path}' is empty")
            digest.update(b"\x00")
        if cols["messages"]:
            flush()
    return Dataset.from_file(str(path)), digest.hexdigest()


# ---- splitting and mixing (index arrays only) ----------------------------------------------------------------


def eval_count(n: int, split: float, cap: int | None) -> int:
    if split <= 0 or n < 2:
        return 0
    k = int(split) if split >= 1 else max(1, round(split * n))
    k = min(k, n - 1)
    return min(k, cap) if cap else k


def apply_weights(examples: list, sources: list[DataSource], rng) -> list:
    """Repeat each source floor(w) times and sample the fractional part without replacement (objects with a
    `.source` index; `random.Random` rng). The preference stages mix their in-memory records with this."""
    import math

    out: list = []
    for i, src in enumerate(sources):
        own = [e for e in examples if e.source == i]
        whole, frac = int(math.floor(src.weight)), src.weight - math.floor(src.weight)
        out.extend(own * whole)
        out.extend(rng.sample(own, round(frac * len(own))))
    return out


def weighted_rows(source_of: np.ndarray, rows: np.ndarray, sources: list[DataSource], rng) -> np.ndarray:
    """`apply_weights` on index arrays: row indices with each source repeated floor(w) times plus a seeded
    sample (without replacement) of round(frac(w) · n) of its rows (numpy Generator rng)."""
    import numpy as np

    parts = []
    for i, src in enumerate(sources):
        own = rows[source_of[rows] == i]
        whole, frac = int(np.floor(src.weight)), src.weight - np.floor(src.weight)
        parts.extend([own] * whole)
        k = round(frac * len(own))
        if k:
            parts.append(np.sort(rng.choice(own, size=k, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---- tokenizing ----------------------------------------------------------------------------------------------


class _TokenizeBatch:
    """`datasets.map` function (picklable for num_proc): messages JSON → input_ids, labels and counts."""

    def __init__(self, tok, max_length: int, train_on: str, truncation: str):
        self.tok, self.max_length, self.train_on, self.truncation = tok, max_length, train_on, truncation

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "dropped": [], "truncated": [], "targets": []}
        conversations = [json.loads(msgs) for msgs in batch["messages"]]
        for t in tokenize_conversations(self.tok, conversations, self.max_length, self.train_on, self.truncation):
            out["input_ids"].append(t.input_ids)
            out["labels"].append(t.labels)
            out["dropped"].append(t.dropped or "")
            out["truncated"].append(bool(t.truncated))
            out["targets"].append(sum(1 for label in t.labels[1:] if label != -100))
        return out


def _workers(n: int) -> int:
    """Processes for tokenization: the cores this process may use for large data (forking costs seconds), one
    for small data."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n // 20_000))


def _tokenize(ds: Dataset, tok, cfg: DataConfig, stats: DataStats | None, work: Path, what: str) -> Dataset:
    import pyarrow.compute as pc

    n = len(ds)
    started = time.perf_counter()
    if n >= PROGRESS_EVERY:
        console.print(f"tokenizing {what}: {n:,} records on {_workers(n)} process(es)")
    out = ds.map(_TokenizeBatch(tok, cfg.max_length, cfg.train_on, cfg.truncation), batched=True, batch_size=1000,
                 num_proc=_workers(n) if _workers(n) > 1 else None, remove_columns=ds.column_names,
                 cache_file_name=str(work / f"{what}-tokenized.arrow"), load_from_cache_file=False,
                 desc=f"tokenizing {what}")
    table = out.data
    dropped = table.column("dropped")
    keep = pc.equal(dropped, "")
    if stats is not None:
        stats.dropped_too_long = int(pc.sum(pc.equal(dropped, "too_long")).as_py() or 0)
        stats.dropped_no_target = int(pc.sum(pc.equal(dropped, "no_target")).as_py() or 0)
        # dropped rows hold no tokens and no targets, so sums over all rows need no filtered copy of the table
        stats.truncated = int(pc.sum(pc.and_(keep, table.column("truncated"))).as_py() or 0)
        stats.train_tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        stats.target_tokens = int(pc.sum(table.column("targets")).as_py() or 0)
    import numpy as np

    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
    out = out.select(rows) if len(rows) != n else out
    if n >= PROGRESS_EVERY:
        console.print(f"tokenized {what}: {n:,} records in {time.perf_counter() - started:.1f} s")
    return out.select_columns(["input_ids", "labels"])


# ---- the cache -----------------------------------------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def _tokenizer_identity(tok) -> str:
    """What decides token ids: the tokenizer's files (path, size, mtime) when it was loaded from a folder, else its
    serialised form; plus what tunekit changes in memory (chat template, added and special tokens)."""
    h = hashlib.sha256()
    added = sorted((int(i), str(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items())
    h.update(json.dumps([type(tok).__name__, len(tok), tok.chat_template, str(tok.eos_token), str(tok.pad_token),
                         str(tok.bos_token), added], default=str).encode())
    folder = Path(str(getattr(tok, "name_or_path", "") or ""))
    files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()] if folder.is_dir() else []
    if files:
        h.update(json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    else:  # built in memory or from the hub cache by id: hash the whole tokenizer (about a second for 50k tokens)
        backend = getattr(tok, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    return h.hexdigest()


def _source_identity(src: DataSource) -> list:
    files = source_files(src.path)
    if not files:  # a hub dataset: its id, split and config name
        return [src.model_dump(), "hub"]
    return [src.model_dump(), [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cache_key(cfg: DataConfig, tok, seed: int) -> str:
    """Key of the tokenized data: inputs (files by path, size and mtime; hub ids), data section, seed, tokenizer."""
    parts = [CACHE_VERSION, cfg.model_dump(mode="json", exclude={"train", "eval"}), seed,
             [_source_identity(s) for s in as_sources(cfg.train, cfg.format)],
             [_source_identity(s) for s in as_sources(cfg.eval, cfg.format)], _tokenizer_identity(tok)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def data_cache_dir() -> Path:
    from tunekit.models.embedded import cache_root

    return cache_root() / "data"


def _load_cached(folder: Path) -> SFTData | None:
    from datasets import load_from_disk

    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    train = load_from_disk(str(folder / "train"))
    ev = load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return SFTData(train, ev, DataStats(**meta["stats"]), meta["eval_messages"], cached=True)


# ---- the whole path ------------------------------------------------------------------------------------------


def build_sft_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, seed: int, cache: bool = True) -> SFTData:
    """Tokenized train (and eval) datasets for supervised fine-tuning (from the cache when the inputs match)."""
    seed = cfg.seed if cfg.seed is not None else seed
    train_sources = as_sources(cfg.train, cfg.format)
    if not train_sources:
        raise TunekitError("data.train is not set: give a file, folder or hub dataset id")
    key = cache_key(cfg, tok, seed)
    folder = data_cache_dir() / key
    if cache:
        found = _load_cached(folder)
        if found is not None:
            console.print(f"data: tokenized data read from the cache ({folder})")
            return found
    work = folder.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        data = _build(cfg, tok, seed, train_sources, work)
        meta = {"stats": asdict(data.stats), "eval_messages": data.eval_messages, "key": key}
        data.train.save_to_disk(str(work / "train"))
        if data.eval is not None:
            data.eval.save_to_disk(str(work / "eval"))
        (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
        for f in work.glob("*.arrow"):  # intermediate files; the saved datasets hold their own copies
            f.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    out = _load_cached(folder)
    out.cached = False
    return out


def _build(cfg: DataConfig, tok, seed: int, train_sources: list[DataSource], work: Path) -> SFTData:
    import numpy as np

    rng = np.random.default_rng(seed)
    records, digest = _normalise_to_arrow(train_sources, cfg.system_prompt, work / "train-records.arrow", "train")
    n = len(records)
    source_of = np.asarray(records.data.column("source").to_numpy(zero_copy_only=False))
    eval_sources = as_sources(cfg.eval, cfg.format)
    if eval_sources:
        eval_records, eval_digest = _normalise_to_arrow(eval_sources, cfg.system_prompt,
                                                        work / "eval-records.arrow", "eval")
        if cfg.max_eval_samples:
            eval_records = eval_records.select(range(min(cfg.max_eval_samples, len(eval_records))))
        pool = np.arange(n)
    else:
        eval_digest = ""
        k = eval_count(n, cfg.eval_split, cfg.max_eval_samples)
        order = rng.permutation(n)
        held = np.sort(order[:k])
        eval_records = records.select(held) if k else None
        pool = np.sort(order[k:])
    train_rows = weighted_rows(source_of, pool, train_sources, rng)
    train_rows = train_rows[rng.permutation(len(train_rows))]
    if cfg.max_samples:
        train_rows = train_rows[: cfg.max_samples]
    h = hashlib.sha256(f"{digest}|{eval_digest}|{seed}|".encode())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    stats = DataStats(fingerprint=h.hexdigest()[:16])
    counts = np.bincount(source_of[train_rows], minlength=len(train_sources)) if len(train_rows) else None
    for i, src in enumerate(train_sources):
        stats.sources.append({"path": src.path, "weight": src.weight,
                              "used": int(counts[i]) if counts is not None else 0})
    train_ds = _tokenize(records.select(train_rows), tok, cfg, stats, work, "train")
    if len(train_ds) == 0:
        files = ", ".join(src.path for src in train_sources)
        raise TunekitError(f"{files}: all {len(train_rows)} training examples were dropped by tokenization "
                           f"({stats.dropped_too_long} longer than data.max_length={cfg.max_length} with "
                           f"data.truncation: drop, {stats.dropped_no_target} with no answer token left to learn "
                           "from); raise data.max_length or shorten the records")
    stats.train_records = len(train_ds)
    eval_ds, eval_messages = None, []
    if eval_records is not None and len(eval_records):
        eval_messages = [json.loads(m) for m in eval_records["messages"]]
        eval_ds = _tokenize(eval_records, tok, cfg, None, work, "eval")
    stats.eval_records = len(eval_ds) if eval_ds is not None else 0
    if cfg.packing:
        from trl.data_utils import pack_dataset

        train_ds = pack_dataset(train_ds, seq_length=cfg.max_length, strategy="bfd")
        stats.packed_rows = len(train_ds)
    return SFTData(train_ds, eval_ds, stats, eval_messages)
