"""Read records from local files (jsonl, json, csv, parquet, folders of them) or hub datasets.

Local files are read here rather than through `datasets.load_dataset("json")` so that every record keeps its
file and line number: a malformed record is reported as `data.jsonl:17: ...`, which the datasets loader
cannot do. Hub ids go to `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (`file:line` or `hub-id[split] row N`)."""

    data: dict[str, Any]
    where: str


def read_source(path: str, split: str = "train", name: str | None = None) -> list[Record]:
    """All records of a file, folder or hub dataset."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise TunekitError(f"data folder '{p}' holds no {'/'.join(SUFFIXES)} files")
        return [r for f in files for r in _read_file(f)]
    if p.is_file():
        return list(_read_file(p))
    if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in SUFFIXES:
        raise TunekitError(f"data file '{path}' not found")
    return _read_hub(path, split, name)


def _read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise TunekitError(f"data file '{path}': unsupported type (use {', '.join(SUFFIXES)})")


def _expect_object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TunekitError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunekitError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            yield Record(_expect_object(obj, where), where)


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON array of objects (or {"data": [...]}), each element located by its line."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TunekitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(whole, dict):
        lists = [v for v in whole.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunekitError(f"{path}: expected a JSON array of records (or an object holding one array)")
        whole = lists[0]
        start = text.index("[")
    elif isinstance(whole, list):
        start = text.index("[")
    else:
        raise TunekitError(f"{path}: expected a JSON array of records")
    # Walk the array again to learn where each element starts, for line numbers.
    idx = start + 1
    for _ in whole:
        while text[idx] in " \t\r\n,":
            idx += 1
        obj, end = decoder.raw_decode(text, idx)
        where = f"{path}:{text.count(chr(10), 0, idx) + 1}"
        yield Record(_expect_object(obj, where), where)
        idx = end


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise TunekitError(f"{where}: more fields than the header has")
            yield Record({k: v for k, v in row.items()}, where)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}: row {i + 1}")


def _read_hub(path: str, split: str, name: str | None) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # the hub raises many types; all mean "cannot read this dataset"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(f"cannot load dataset '{path}' (split '{split}'): {first}") from None
    return [Record(dict(row), f"{path}[{split}] row {i + 1}") for i, row in enumerate(ds)]
