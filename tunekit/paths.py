"""Where a path written in a recipe or pipeline file points, wherever tunekit runs from.

- `tunekit/assets/...` names the installed package's own assets (a checkout, an editable or a wheel install);
- a relative path resolves against the folder of the file that holds it when it exists there (to one absolute
  path, so a pipeline's fingerprints do not depend on the working directory); otherwise it stays as written
  (relative to the working directory: run directories like `runs/demo`, hub ids such as `Qwen/Qwen2.5-0.5B`,
  which must never be taken for a missing local path);
- shipped recipes are found by name (`tunekit sft sft-lora-demo`) in the checkout's `recipes/` or, from a wheel,
  in the package data `tunekit/recipes/`.

The recipe keys that hold paths are listed once here (`RECIPE_PATH_KEYS`), so `tunekit sft`, `tunekit run` and
every other reader resolve the same keys the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tunekit

PACKAGE_DIR = Path(tunekit.__file__).resolve().parent
ASSETS_PREFIX = "tunekit/assets/"

#: recipe keys whose values are paths (dotted; `[]` marks a list whose entries are sources or rewards)
RECIPE_PATH_KEYS = ("model.name", "model.chat_template", "data.train", "data.eval", "cai.constitution",
                    "cai.prompts", "cai.eval_prompts", "cai.critic_model", "cai.feedback_model")


def assets_dir() -> Path:
    """The package's assets folder (tunekit/assets)."""
    return PACKAGE_DIR / "assets"


def recipes_dirs() -> list[Path]:
    """Where shipped recipes live: the checkout's `recipes/` (next to the package), then the wheel's copy."""
    return [d for d in (PACKAGE_DIR.parent / "recipes", PACKAGE_DIR / "recipes") if d.is_dir()]


def resolve_path(value: str, base: Path | None) -> str:
    """`value` as a path usable from any working directory (see the module docstring); unchanged otherwise."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    if value.startswith(ASSETS_PREFIX):
        return str(assets_dir() / value[len(ASSETS_PREFIX):])
    p = Path(value).expanduser()
    if p.is_absolute() or base is None:
        return value
    candidate = base / p
    if candidate.exists():  # the file's folder wins, and as one absolute path whatever the working directory
        return str(candidate.resolve())
    return value


def resolve_shipped_recipe(value: str | Path) -> Path:
    """A recipe argument: an existing file as given; else a shipped recipe by name or path (`sft-lora-demo`,
    `recipes/pipelines/assistant-demo.yaml`), looked up in the checkout or the installed package."""
    p = Path(value).expanduser()
    if p.exists() or p.is_absolute():
        return p
    text = str(value)
    names = [text, text + ".yaml"] if not text.endswith((".yaml", ".yml")) else [text]
    for folder in recipes_dirs():
        for name in names:
            for candidate in (folder / name, folder / name.removeprefix("recipes/")):
                if candidate.is_file():
                    return candidate
    return p


def _map_sources(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [{**v, "path": fn(v["path"])} if isinstance(v, dict) and isinstance(v.get("path"), str) else v
                for v in value]
    return value


def resolve_recipe_paths(data: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """A copy of a recipe mapping with its path keys resolved against `base` (the recipe file's folder)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}

    def fn(v: str) -> str:
        return resolve_path(v, base)

    for key in RECIPE_PATH_KEYS:
        section, name = key.split(".")
        node = out.get(section)
        if isinstance(node, dict) and name in node:
            node[name] = _map_sources(node[name], fn)
    rewards = out.get("rewards")
    if isinstance(rewards, list):
        out["rewards"] = [{**r, "path": fn(r["path"])} if isinstance(r, dict) and isinstance(r.get("path"), str)
                          else r for r in rewards]
    return out
