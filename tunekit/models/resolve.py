"""Which model a name means: a local folder, an alias, a run directory, the hub cache, or the hub — in that order.

Every command (sft, dpo, eval, merge, quantize, ...) resolves `model.name` and its model arguments here, so one
name means one thing everywhere and a mistake fails the same way, at once:
- a name that looks like a path (it exists, starts with `.`, `/` or `~`, has a model file's suffix, has more
  than one `/`, or its parent folder exists, e.g. `runs/sft` beside a `runs/` folder) is never sent to the hub;
- a hub id already in the Hugging Face cache resolves to its cached snapshot folder (no network);
- otherwise the hub is asked only when it can be: with `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` set, or its
  endpoint refusing a TCP connection within 2 s, the error comes at once instead of after the hub client's
  retries (about 55 s of `Retrying in Ns` lines), and it names every place that was tried.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from tunekit.errors import TunekitError

#: suffixes of model files and recipes: a name ending in one is a file path, never a hub id.
FILE_SUFFIXES = frozenset({".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml",
                           ".jsonl", ".txt", ".onnx", ".pkl", ".npz"})
#: a hub repo id: `name` or `org/name` (letters, digits, `-`, `_`, `.`).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_PROBE_SECONDS = 2.0
_TRUE = {"1", "on", "yes", "true"}


def looks_like_path(name: str) -> bool:
    """True for a name that can only mean a file or folder on this machine (see the module docstring)."""
    if not name:
        return True
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES:
        return True
    if name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and path.parent.is_dir()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set (read now, not when huggingface_hub was imported)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """(reachable, why not): one TCP connect to the hub endpoint, bounded by `timeout` including DNS."""
    url = urlparse(hub_endpoint())
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(exc.strerror or type(exc).__name__)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return False, f"{host}:{port} did not answer within {timeout:g} s"
    return (not outcome[0]), (f"{host}:{port}: {outcome[0]}" if outcome[0] else "")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The hub cache's snapshot folder of `repo` (it holds a config.json), or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    except Exception:  # noqa: BLE001 - an id the cache cannot even look up is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model(name: str, revision: str | None = None, *, need_config: bool = True) -> Path | str:
    """The folder `name` means (alias → cached folder, existing path, cached hub snapshot), or the hub id itself
    when it must be downloaded and the hub can be reached. Anything else is a TunekitError naming what was tried.

    `need_config`: a folder must hold a config.json (a plain model); False accepts any existing folder (the caller
    classifies runs and adapters itself, tunekit.run.locate)."""
    from tunekit.models.embedded import ALIASES, embedded_path

    name = str(name)
    if name in ALIASES:
        return embedded_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and need_config and not (path / "config.json").is_file():
            raise TunekitError(f"model folder '{path}' has no config.json (not a model folder)")
        return path
    tried = [f"local folder ({path.absolute()}: does not exist)", f"alias (known: {', '.join(sorted(ALIASES))})",
             "run directory (none at that path)"]
    if looks_like_path(name) or not HUB_ID.match(name):
        why = "a path" if looks_like_path(name) else "not a hub id org/name"
        tried.append(f"hub cache and hub (not asked: '{name}' is {why})")
        raise TunekitError(f"model '{name}' not found; tried " + "; ".join(tried))
    snapshot = cached_snapshot(name, revision)
    if snapshot is not None:
        return snapshot
    tried.append(f"hub cache ({hub_cache_dir()}: not cached)")
    if hub_offline():
        tried.append("hub (not asked: HF_HUB_OFFLINE is set)")
        raise TunekitError(f"model '{name}' not found; tried " + "; ".join(tried))
    reachable, why = hub_reachable()
    if not reachable:
        tried.append(f"hub ({hub_endpoint()} unreachable: {why})")
        raise TunekitError(f"model '{name}' not found; tried " + "; ".join(tried))
    return name
