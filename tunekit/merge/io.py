"""Streaming safetensors I/O: read tensors (or row ranges of them) from sharded folders, write sharded output.

Reading uses `safetensors.safe_open`; each read opens the file, copies the requested rows and closes it
again, so
the memory map (and the page-cache pages it touched, which count towards RSS) never holds more than one read.

Writing is by hand because safetensors has no streaming writer (`save_file` needs every tensor of a shard in
memory): the whole output plan (names, shapes, dtypes) is known before any data is computed, so each shard's
header is written first and the tensor bytes are appended as they are computed, in header order.
Format (safetensors spec): u64 little-endian header length, JSON header padded with spaces to 8 bytes,
raw data.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tunekit.errors import TunekitError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype tag -> (torch dtype name, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_TORCH_TO_ST = {v[0]: k for k, v in _ST_DTYPES.items()}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def normalize_dtype(name: str | None, where: str = "dtype") -> str | None:
    """'bf16' / 'bfloat16' / 'torch.bfloat16' -> 'bfloat16'; None stays None; anything else is a
    TunekitError."""
    if name is None:
        return None
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise TunekitError(f"{where}: unsupported dtype '{name}' (use float32, float16 or bfloat16)")
    return _DTYPE_ALIASES[key]


def element_size(dtype_name: str) -> int:
    return _ST_DTYPES[_TORCH_TO_ST[dtype_name]][1]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1234 -> 1234 (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise TunekitError(f"--shard-size: cannot parse '{text}' (examples: 5GB, 500MB, 2GiB)")
    value, unit = float(m.group(1)), m.group(2).lower().rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    if unit not in scale:
        raise TunekitError(f"--shard-size: unknown unit in '{text}'")
    size = int(value * scale[unit])
    if size <= 0:
        raise TunekitError(f"--shard-size: must be positive, got '{text}'")
    return size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    tag: str  # safetensors dtype tag, e.g. "BF16"
    file: Path

    @property
    def dtype(self) -> str:
        return _ST_DTYPES[self.tag][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.tag in FLOAT_TAGS


def _read_header(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunekitError(f"{file}: not a readable safetensors file ({exc})") from None


def check_finite(tensor: Any, what: str) -> None:
    """Merging never reads or writes nan/inf: a non-finite float tensor stops it (NumericalError)."""
    import torch

    from tunekit.errors import NumericalError

    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalError(f"{what} has {bad} non-finite values (nan/inf); nothing was written")


class SafetensorsFolder:
    """A model folder of safetensors weights (`model.safetensors`, or shards with
    `model.safetensors.index.json`).

    Only headers are read up front; tensors are read on demand, whole or by row range.
    """

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.is_dir():
            raise TunekitError(f"model '{self.label}': folder not found")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise TunekitError(f"{index}: invalid index json ({exc})") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            if any(self.path.glob("*.bin")):
                raise TunekitError(
                    f"model '{self.label}': only .bin weights found; convert to safetensors first"
                )
            raise TunekitError(f"model '{self.label}': no *.safetensors weights in {self.path}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            file = self.path / fname
            if not file.is_file():
                raise TunekitError(f"model '{self.label}': shard '{fname}' listed in the index is missing")
            for name, meta in _read_header(file).items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise TunekitError(f"{file}: tensor '{name}' has unsupported dtype {meta['dtype']}")
                self.tensors[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], file)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise TunekitError(f"model '{self.label}': tensor '{name}' is missing") from None

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: Any = None) -> Any:
        """Tensor `name` (or rows [r0, r1) of its first dimension), optionally cast (e.g. torch.float32)."""
        from safetensors import safe_open

        from tunekit.errors import reading

        info = self.info(name)
        with reading(info.file), safe_open(str(info.file), framework="pt") as fh:
            if rows is None or len(info.shape) == 0:
                t = fh.get_tensor(name)
            else:
                t = fh.get_slice(name)[rows[0] : rows[1]]
        check_finite(t, f"model '{self.label}': input tensor '{name}'")
        return t if dtype is None else t.to(dtype)


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class ShardedWriter:
    """Write a known list of tensors into size-limited safetensors shards, streaming data as it is produced.

    Usage: `w = ShardedWriter(folder, plan, max_shard_bytes)`, then for each planned tensor in order call
    `w.write(name, chunk)` one or more times with consecutive row chunks (any float/int torch tensor already
    cast to the planned dtype), then `w.close()` which checks completeness and writes the index.
    """

    def __init__(
        self,
        folder: str | Path,
        plan: Iterable[tuple[str, tuple[int, ...], str]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        items = [_Planned(n, tuple(s), d, math.prod(s) * element_size(d)) for n, s, d in plan]
        shards: list[list[_Planned]] = [[]]
        size = 0
        for it in items:
            if shards[-1] and size + it.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(it)
            size += it.nbytes
        n = len(shards)
        self.shard_names = (
            [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.total_size = sum(it.nbytes for it in items)
        self._order = [(si, it) for si, shard in enumerate(shards) for it in shard]
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes written of the current tensor
        self._fh: IO[bytes] | None = None
        self._shard_open = -1

    def _open_shard(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for it in self.shards[si]:
            header[it.name] = {
                "dtype": _TORCH_TO_ST[it.dtype],
                "shape": list(it.shape),
                "data_offsets": [offset, offset + it.nbytes],
            }
            offset += it.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.folder / self.shard_names[si], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard_open = si

    def write(self, name: str, chunk: Any) -> None:
        """Append the next row chunk of tensor `name` (which must be the next planned tensor)."""
        import torch

        if self._pos >= len(self._order):
            raise RuntimeError(f"writer: unexpected tensor {name}")
        si, it = self._order[self._pos]
        if it.name != name:
            raise RuntimeError(f"writer: expected tensor {it.name}, got {name}")
        if str(chunk.dtype).removeprefix("torch.") != it.dtype:
            raise RuntimeError(f"writer: {name} has dtype {chunk.dtype}, planned {it.dtype}")
        check_finite(chunk, f"output tensor '{name}'")
        if si != self._shard_open:
            self._open_shard(si)
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._fh is not None
        self._fh.write(memoryview(data))
        self._written += data.nbytes
        if self._written > it.nbytes:
            raise RuntimeError(f"writer: too much data for {name}")
        if self._written == it.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._order):
            missing = self._order[self._pos][1].name
            raise RuntimeError(f"writer: tensor {missing} was not (fully) written")
        if len(self.shard_names) > 1:
            weight_map = {it.name: self.shard_names[si] for si, it in self._order}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
