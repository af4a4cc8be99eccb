"""The output side of a merge: the support files beside the weights (config, tokenizer), the model card, the
progress bar over bytes written. Shared by `merge_models` (engine.py) and `merge_adapter` (adapters.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def copy_support_files(src_config: Path, src_tokenizer: Path, out: Path, out_dtype: str | None) -> None:
    """config.json, generation_config.json from `src_config` and the tokenizer files from `src_tokenizer` into
    `out`; config.json gets `dtype` = `out_dtype` when the weights were cast."""
    for name in CONFIG_FILES:
        if (src_config / name).is_file():
            shutil.copy2(src_config / name, out / name)
    for name in TOKENIZER_FILES:
        if (src_tokenizer / name).is_file():
            shutil.copy2(src_tokenizer / name, out / name)
    cfg_file = out / "config.json"
    if out_dtype and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg["dtype"] = out_dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = out_dtype
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def write_model_card(
    out: Path, title: str, method: str, config_yaml: str, notes: list[str] | None = None
) -> None:
    """README.md of a merged model: title, method, notes and the merge configuration."""
    lines = [
        "---",
        "tags: [merge, tunekit]",
        "---",
        f"# {title}",
        "",
        f"Made with `tunekit merge` using the **{method}** method.",
        "",
        *(f"- {n}" for n in notes or []),
        "",
        "## Merge configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def byte_progress(total: int, enabled: bool, label: str = "merging"):
    """A rich progress bar over bytes written (on stderr), or a no-op."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
    task = progress.add_task(label, total=total)
    return progress, task
