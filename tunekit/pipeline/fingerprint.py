"""A stage's fingerprint: what decides its output, hashed.

    fingerprint = sha256(resolved input (recipe after `from:` substitution, or options) with stage outputs
                         written as `<stage:X>`, content hash of every local input file, upstream fingerprints,
                         versions of tunekit, torch, transformers, peft, trl, accelerate, datasets)

File contents are hashed (not modification times: an in-place edit is caught, a `touch` is not a change), with
a memo keyed by (path, size, mtime) so a fully cached pipeline re-reads nothing (the data cache's identity,
tunekit.data.pipeline, keys files the same way). A stage's outputs get a manifest (size, mtime, sha256 per
file) when it finishes, so an output altered or removed since is detected and re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("tunekit", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


def versions() -> dict[str, str]:
    """Versions of tunekit and the libraries that change results."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "tunekit":
                import tunekit

                out[name] = tunekit.__version__
            else:
                out[name] = "not installed"
    return out


class FileHashes:
    """sha256 of files, memoised by (absolute path, size, mtime_ns) in a JSON file across runs."""

    def __init__(self, memo_file: Path | None = None):
        self.memo_file = memo_file
        self.memo: dict[str, list] = {}
        if memo_file is not None and memo_file.is_file():
            try:
                self.memo = json.loads(memo_file.read_text())
            except ValueError:
                self.memo = {}
        self.changed = False

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.memo.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        self.memo[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def path(self, path: str | Path) -> dict[str, str]:
        """{relative name: sha256} of a file or of every file under a folder."""
        p = Path(path).expanduser()
        if p.is_file():
            return {p.name: self.file(p)}
        out = {}
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                f = Path(root) / name
                out[str(f.relative_to(p))] = self.file(f)
        return out

    def save(self) -> None:
        if self.memo_file is not None and self.changed:
            self.memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.memo))
            tmp.replace(self.memo_file)


def placeholders(value: Any, stage_paths: dict[str, str]) -> Any:
    """Stage outputs written as `<stage:X>` (they are covered by X's fingerprint, not by their path)."""
    if isinstance(value, dict):
        return {k: placeholders(v, stage_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [placeholders(v, stage_paths) for v in value]
    if isinstance(value, str) and value in stage_paths:
        return f"<stage:{stage_paths[value]}>"
    return portable(value) if isinstance(value, str) else value


def portable(path: str) -> str:
    """The package's own assets as `tunekit/assets/...`, wherever tunekit is installed (so a moved checkout or
    a new virtual environment does not change fingerprints)."""
    from tunekit.paths import ASSETS_PREFIX, assets_dir

    root = str(assets_dir()) + "/"
    return ASSETS_PREFIX + path[len(root):] if path.startswith(root) else path


def input_files(paths: list[str], hashes: FileHashes) -> dict[str, dict[str, str]]:
    """{path as given: {file: sha256}} of a stage's local inputs."""
    return {portable(p): hashes.path(p) for p in sorted(set(paths))}


def fingerprint(described: dict[str, Any], files: dict[str, Any], upstream: dict[str, str],
                libs: dict[str, str]) -> str:
    payload = {"input": described, "files": files, "upstream": upstream, "versions": libs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def manifest(folder: Path, hashes: FileHashes) -> dict[str, list]:
    """{relative file: [size, mtime_ns, sha256]} of a stage's output."""
    out = {}
    base = folder if folder.is_dir() else folder.parent
    files = [folder] if folder.is_file() else [Path(r) / f for r, _, fs in os.walk(folder) for f in fs]
    for f in sorted(files):
        st = f.stat()
        out[str(f.relative_to(base))] = [st.st_size, st.st_mtime_ns, hashes.file(f)]
    return out


def altered(folder: Path, stored: dict[str, list], hashes: FileHashes) -> str | None:
    """Why the output differs from its manifest (a file missing, added or changed), or None."""
    if not folder.exists():
        return f"output {folder} is missing"
    base = folder if folder.is_dir() else folder.parent
    files = [folder] if folder.is_file() else [Path(r) / f for r, _, fs in os.walk(folder) for f in fs]
    now = {str(f.relative_to(base)): f for f in files}
    for name in stored:
        if name not in now:
            return f"output file {name} was removed"
    for name in now:
        if name not in stored:
            return f"output file {name} was added"
    for name, (size, mtime, digest) in stored.items():
        st = now[name].stat()
        if st.st_size != size:
            return f"output file {name} was changed"
        if st.st_mtime_ns != mtime and hashes.file(now[name]) != digest:
            return f"output file {name} was changed"
    return None
