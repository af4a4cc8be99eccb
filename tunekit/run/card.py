"""The run card: what produced a run (versions, git commit, data fingerprint, seed, hardware, command)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

PACKAGES = ("tunekit", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "gguf")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | None = None) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=False)
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    from tunekit.launch.allocator import allocator_in_use

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": [],
        "allocator": allocator_in_use(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_card(stage: str, seed: int, data_fingerprint: str | None, extra: dict[str, Any] | None = None) -> dict:
    return {
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "seed": seed,
        "data_fingerprint": data_fingerprint,
        "git_commit": git_commit(),
        "versions": versions(),
        "hardware": hardware(),
        **(extra or {}),
    }
