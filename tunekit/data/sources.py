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
    """All records of a file, folder or hub dataset (a list; `iter_source` streams them)."""
    return list(iter_source(path, split, name))


def iter_source(path: str, split: str = "train", name: str | None = None) -> Iterator[Record]:
    """Records of a file, folder or hub dataset, one at a time: memory does not grow with the file size
    (except `.json`, an array that is parsed whole)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise TunekitError(f"data folder '{p}' holds no {'/'.join(SUFFIXES)} files")
        for f in files:
            yield from _read_file(f)
        return
    if p.is_file():
        yield from _read_file(p)
        return
    if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in SUFFIXES:
        raise TunekitError(f"data file '{path}' not found")
    yield from _read_hub(path, split, name)


def source_files(path: str) -> list[Path]:
    """The local files a source reads (empty for a hub id), for fingerprints."""
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    return [p] if p.is_file() else []


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


def _not_utf8(where: str, exc: UnicodeDecodeError) -> TunekitError:
    return TunekitError(f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); is the file binary or "
                        "in another encoding?")


BOM = b"\xef\xbb\xbf"
NEWLINE = b"\n"


def _read_jsonl(path: Path) -> Iterator[Record]:
    """One JSON object per line; a UTF-8 BOM is skipped; bytes are decoded per line so errors name the line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(where, exc) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                cut = " (the file ends mid-record: truncated?)" if not raw.endswith(b"\n") else ""
                raise TunekitError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno}){cut}") from None
            yield Record(_expect_object(obj, where), where)


class _Lines:
    """Line number of a character offset, counted incrementally (offsets only move forward)."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def at(self, idx: int) -> int:
        self.line += self.text.count("\n", self.offset, idx)
        self.offset = idx
        return self.line


def _skip_ws(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON array of objects, or an object holding exactly one array of records ({"data": [...]}).

    The array is found by parsing the top level (keys and values), never by searching for a '[' (which could sit
    inside a string); each element is located by its line.
    """
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(f"{path}:{raw.count(NEWLINE, 0, exc.start) + 1}", exc) from None
    decoder = json.JSONDecoder()
    lines = _Lines(text)

    def decode(idx: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            cut = " (the file ends early: truncated?)" if exc.pos >= len(text.rstrip()) else ""
            raise TunekitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}{cut}") from None

    def fail(idx: int, msg: str) -> TunekitError:
        end = " (the file ends early: truncated?)" if idx >= len(text) else ""
        return TunekitError(f"{path}:{text.count(chr(10), 0, idx) + 1}: invalid JSON: {msg}{end}")

    idx = _skip_ws(text, 0)
    if idx >= len(text):
        raise TunekitError(f"{path}: empty file (expected a JSON array of records)")
    array_at = idx
    if text[idx] == "{":
        arrays, idx = [], _skip_ws(text, idx + 1)
        while idx < len(text) and text[idx] != "}":
            key, idx = decode(idx)
            idx = _skip_ws(text, idx)
            if idx >= len(text) or text[idx] != ":":
                raise fail(idx, "expected ':' after an object key")
            idx = _skip_ws(text, idx + 1)
            value_at = idx
            value, idx = decode(idx)
            if isinstance(value, list):
                arrays.append((key, value_at))
            idx = _skip_ws(text, idx)
            if idx < len(text) and text[idx] == ",":
                idx = _skip_ws(text, idx + 1)
            elif idx >= len(text) or text[idx] != "}":
                raise fail(idx, "expected ',' or '}' in the top-level object")
        if idx >= len(text):
            raise fail(idx, "the top-level object is not closed")
        if len(arrays) != 1:
            found = ", ".join(repr(k) for k, _ in arrays) or "none"
            raise TunekitError(f"{path}: expected a JSON array of records (or an object holding one array; "
                               f"arrays found: {found})")
        array_at = arrays[0][1]
    elif text[idx] != "[":
        decode(idx)  # reports invalid JSON with its line, else it is a scalar
        raise TunekitError(f"{path}: expected a JSON array of records")
    else:
        _, end = decode(idx)  # the whole array is valid JSON before any record is used
        if text[_skip_ws(text, end) :].strip():
            raise fail(_skip_ws(text, end), "extra data after the array")
    idx = _skip_ws(text, array_at + 1)
    while idx < len(text) and text[idx] != "]":
        obj, end = decode(idx)
        where = f"{path}:{lines.at(idx)}"
        yield Record(_expect_object(obj, where), where)
        idx = _skip_ws(text, end)
        if idx < len(text) and text[idx] == ",":
            idx = _skip_ws(text, idx + 1)


def _text_lines(fh, path: Path) -> Iterator[str]:
    """Decoded lines of a binary file (BOM skipped); a byte that is not UTF-8 is reported with its line."""
    for lineno, raw in enumerate(fh, 1):
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(f"{path}:{lineno}", exc) from None


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open("rb") as fh:
        reader = csv.DictReader(_text_lines(fh, path))
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise TunekitError(f"{where}: more fields than the header has")
                yield Record({k: v for k, v in row.items()}, where)
        except csv.Error as exc:
            raise TunekitError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    """Row groups are read in batches of 1,024 rows, not the whole table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield Record(row, f"{path}: row {n}")
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(f"{path}: not a readable parquet file ({first})") from None


def _read_hub(path: str, split: str, name: str | None) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # the hub raises many types; all mean "cannot read this dataset"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(f"cannot load dataset '{path}' (split '{split}'): {first}") from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{path}[{split}] row {i + 1}")
