"""Merge inputs: resolve a mergekit model reference to a streamable tensor source.

A reference is a local folder, a tunekit alias, a hub id (`org/name` or `org/name@revision`, read from the
Hugging Face hub cache through `huggingface_hub.snapshot_download`; with HF_HUB_OFFLINE=1 a model missing from
the cache is a clean error), or `MODEL+ADAPTER` (a PEFT adapter folder or tunekit run folded into MODEL while
streaming, with the adapter registry's merge plan). `resolve_adapter` finds an adapter folder and its kind in a
folder or a tunekit run; `check_not_quantized` refuses quantized checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.errors import TunekitError
from tunekit.merge.io import SafetensorsFolder, TensorInfo

if TYPE_CHECKING:
    from tunekit.adapters import AdapterKind

#: hub files a merge needs: safetensors weights only (never pickles), configs and tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.txt"]


def resolve_hub(name: str) -> Path:
    """Folder of hub model `org/name[@revision]` in the hub cache; downloads (safetensors only) unless offline."""
    from huggingface_hub import constants, snapshot_download

    repo, _, revision = name.partition("@")
    try:
        return Path(
            snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends): try the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise TunekitError(
            f"model '{name}' is not a local folder and not in the hub cache ({constants.HF_HUB_CACHE}); "
            "HF_HUB_OFFLINE is set, so nothing is downloaded (fetch it with `hf download " + repo + "`)"
        )
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one user-facing line
        raise TunekitError(
            f"model '{name}': not a local folder, and the hub download failed ({type(exc).__name__})"
        ) from None


def resolve_model_path(name: str) -> Path:
    """A local model folder, a tunekit alias or a hub id `org/name[@revision]`, through the one resolver every
    command shares (tunekit.models.resolve: a path is never sent to the hub; an unreachable hub fails at once)."""
    from tunekit.models.embedded import ALIASES
    from tunekit.models.resolve import looks_like_path, resolve_model

    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo, _, revision = (name, "", "") if looks_like_path(name) else name.partition("@")
    resolved = resolve_model(repo, revision or None)
    if repo not in ALIASES and not Path(repo).expanduser().exists():  # a hub id: cached or downloadable
        return resolve_hub(name)
    if isinstance(resolved, Path) and resolved.is_dir():
        return resolved
    raise TunekitError(f"model '{name}' is not a model folder (a file?)")


def resolve_model(name: str | Path) -> Path:
    """A base model folder: a local folder, a tunekit alias or a hub id from the hub cache (not MODEL+ADAPTER)."""
    if "+" in str(name) and not Path(name).expanduser().exists():
        raise TunekitError(f"model '{name}': a MODEL+ADAPTER reference is not a base model folder")
    return resolve_model_path(str(name))


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json ({} when it has none)."""
    file = folder / "config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TunekitError(f"{file}: invalid JSON ({exc})") from None


def check_not_quantized(folder: Path, label: str) -> None:
    """Merges read 16/32-bit weights: a quantized checkpoint is refused."""
    cfg = read_model_config(folder)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "quantized")
        raise TunekitError(
            f"model '{label}' is {method}-quantized; merge the unquantized 16/32-bit weights instead"
        )


@dataclass
class ResolvedAdapter:
    """An adapter folder, its kind, and what its run recorded about the base."""

    folder: Path
    kind: AdapterKind
    base_hint: str | None  # base model named by the run's recipe or the adapter config
    load_in_4bit: bool
    base_file: Path | None = None  # the adapter_config.json base_hint was read from (an adapter outside a run)

    def recorded_base(self) -> str | None:
        """base_hint, for use as the base: a recorded path that does not exist is refused naming base_file."""
        from tunekit.run.locate import check_recorded_base

        return check_recorded_base(self.base_hint, self.base_file)


def resolve_adapter(path: str | Path) -> ResolvedAdapter:
    """A PEFT/tunekit adapter folder, or a tunekit run directory (RUN/recipe.yaml + RUN/adapter/)."""
    from tunekit.adapters import kind_of
    from tunekit.run.locate import locate

    path = Path(path).expanduser()
    if not path.is_dir():
        raise TunekitError(f"adapter '{path}' not found")
    loc = locate(path)
    if loc is None or loc.adapter_dir is None:
        if loc is not None and loc.kind == "run":
            raise TunekitError(f"run '{path}' is a full fine-tune: {loc.model_dir} is already a merged model")
        raise TunekitError(f"'{path}' is a model folder, not an adapter or a run with an adapter")
    kind = kind_of(loc.adapter_dir)
    base = loc.base
    return ResolvedAdapter(loc.adapter_dir, kind, base.name if base else None, bool(base and base.load_in_4bit),
                           loc.base_file)


class ModelSource:
    """One referenced model: its safetensors tensors, with an adapter folded into the tensors it touches.

    `path` is the model folder (config.json, tokenizer); `read` gives a tensor or a row range of it. A tensor
    the adapter edits is computed whole once (W' = edit(W)) and kept until another edited tensor is read, so
    chunked readers do not recompute it.
    """

    def __init__(self, ref: str, path: Path, adapter: Path | None = None, edits: dict | None = None) -> None:
        self.ref = ref
        self.label = ref
        self.path = path
        self.adapter = adapter
        self.folder = SafetensorsFolder(path, label=ref)
        self.edits = edits or {}
        self._cached: tuple[str, Any] | None = None

    def names(self) -> list[str]:
        return self.folder.names()

    def __contains__(self, name: str) -> bool:
        return name in self.folder

    def info(self, name: str) -> TensorInfo:
        return self.folder.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: Any = None) -> Any:
        if name not in self.edits:
            return self.folder.read(name, rows, dtype)
        import torch

        if self._cached is None or self._cached[0] != name:
            self._cached = None
            self._cached = (name, self.edits[name](self.folder.read(name, dtype=torch.float32)))
        full = self._cached[1]
        out = full if rows is None or full.dim() == 0 else full[rows[0] : rows[1]]
        return out.clone() if dtype in (None, torch.float32) else out.to(dtype)


def split_lora_reference(ref: str) -> tuple[str, str | None]:
    """'model+adapter' -> ('model', 'adapter'), as mergekit's ModelReference; a plain reference -> (ref, None)."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    model, _, adapter = ref.partition("+")
    if not model or not adapter or "+" in adapter:
        raise TunekitError(f"model reference '{ref}': expected MODEL+ADAPTER")
    return model, adapter


def open_source(ref: str) -> ModelSource:
    """Resolve a mergekit model reference (folder, alias, hub id, MODEL+ADAPTER) and open its tensors."""
    model, adapter = split_lora_reference(ref)
    path = resolve_model_path(model)
    if adapter is None:
        return ModelSource(ref, path)
    adapter_path = Path(adapter).expanduser()
    if not adapter_path.is_dir():
        raise TunekitError(f"model reference '{ref}': adapter '{adapter}' is not a local folder or tunekit run")
    res = resolve_adapter(adapter_path)
    if res.kind.plan_merge is None:
        raise TunekitError(f"model reference '{ref}': adapter type '{res.kind.name}' cannot be folded into a model")
    source = ModelSource(ref, path, res.folder)
    source.edits = res.kind.plan_merge(res.folder, source.folder)
    return source
