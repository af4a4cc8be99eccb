"""A run directory: `<output>.partial/` while working, renamed to `<output>/` when complete.

Layout: recipe.yaml (resolved), run_card.json, metrics.jsonl, loss.png, checkpoints/, adapter/ or model/,
samples.jsonl. An interrupted run stays at `.partial` and `--resume` continues it from its last checkpoint.
The output guard (guard.py) checks and locks the output in `prepare()`, before any work; a run that fails
before its first checkpoint removes its `.partial` (and the parent folders it made), so it blocks nothing.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError, set_log_dir
from tunekit.launch import ranks
from tunekit.run import guard
from tunekit.run.atomic import commit, partial_path, remove

# Keys that may differ between an interrupted run's recipe and the one resuming it: they do not change what the
# checkpoints mean. Longer training (max_steps, epochs) is allowed, the rest only affects what happens after it.
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.logging_steps", "train.report_to",
                  "train.save_total_limit", "generate.", "output")


def default_output(stage: str) -> Path:
    return Path("runs") / f"{stage}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, final: Path, work: Path, resuming: bool, lock: guard.OutputLock | None = None):
        self.final = final
        self.path = work
        self.resuming = resuming
        self.lock = lock
        self._made: list[Path] = []  # parent folders create() made, removed again if the run fails early

    @classmethod
    def prepare(
        cls, output: str | Path, overwrite: bool = False, resume: bool = False, inputs: list[Any] | tuple = ()
    ) -> RunDir:
        """Check and lock the output before any work; nothing is created until `create()` (after data and model
        load)."""
        if not str(output).strip() or Path(output).name in ("", ".", ".."):
            raise TunekitError(f"output '{output}': a run directory needs a name of its own (e.g. -o runs/my-run), "
                               "not the current, parent or root folder")
        final = Path(output).expanduser()
        work = partial_path(final)
        if not ranks.is_main():  # rank 0 checks and writes; the others follow it
            return cls(final, work, resume)
        guard.check_overlap(final, inputs)
        guard.check_overlap(work, inputs)
        if resume:
            if not work.is_dir():
                if final.is_dir():
                    raise TunekitError(f"run '{final}' is already complete; nothing to resume")
                raise TunekitError(f"no interrupted run at '{work}' to resume")
            if final.exists() and not overwrite:
                raise TunekitError(f"output '{final}' already exists; pass --overwrite to replace it on completion")
        guard.check_replaceable(final, overwrite or resume)
        guard.check_writable(final)
        lock = guard.lock(final)
        run = cls(final, work, resume, lock)
        try:
            if not resume and work.exists() and not overwrite and run.latest_checkpoint() is not None:
                raise TunekitError(
                    f"an interrupted run exists at '{work}'; pass --resume to continue it or --overwrite to restart"
                )
        except BaseException:
            lock.release()
            raise
        return run

    def create(self) -> None:
        """Make the `.partial` folder (a fresh one unless resuming). A `.partial` without a checkpoint is what a
        dead run left (we hold the lock): it is discarded; --overwrite discards an interrupted one too. Rank 0
        makes it; the other ranks wait for it."""
        from tunekit.quiet import library_log_to

        if self.resuming:
            set_log_dir(self.path)
            library_log_to(self.path / "library.log")
        elif ranks.is_main():
            if self.path.exists() or self.path.is_symlink():
                print(f"note: discarding the unfinished run at '{self.path}'", file=sys.stderr)
                remove(self.path)
            self._made = guard.make_parents(self.path)
            self.path.mkdir()
            set_log_dir(self.path)
            library_log_to(self.path / "library.log")  # libraries' warnings, kept off the terminal
        ranks.barrier()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        found = [p for p in self.checkpoints.glob("checkpoint-*")
                 if (p / "trainer_state.json").is_file() and p.name.rsplit("-", 1)[1].isdigit()]
        return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1])) if found else None

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        if ranks.is_main():
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        if ranks.is_main():
            path.write_text(text, encoding="utf-8")
        return path

    def fail(self) -> None:
        """After a failure: keep a `.partial` that has a checkpoint (resumable, the user is told), remove one that
        has none (and the parents create() made), and release the lock. Rank 0 only."""
        if not ranks.is_main():
            return
        try:
            if self.path.is_dir() and self.latest_checkpoint() is None and not self.resuming:
                remove(self.path)
                guard.remove_empty(self._made)
            elif self.path.is_dir():
                print(f"note: the unfinished run is kept at '{self.path}'; continue it with --resume",
                      file=sys.stderr)
        finally:
            self.release()

    def release(self) -> None:
        from tunekit.quiet import library_log_to

        library_log_to(None)
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finish(self) -> Path:
        """Rename `.partial` to the final name (replacing an old run only now, with --overwrite); rank 0 only."""
        ranks.barrier()
        if not ranks.is_main():
            return self.final
        try:
            return commit(self.path, self.final)
        finally:
            self.release()


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, dotted + "."))
        elif a != b:
            out.append(dotted)
    return out


def check_resume(recipe: Any, run: RunDir) -> None:
    """Refuse `--resume` with a recipe that would not continue the same run, naming the changed keys; called
    before any file of the run is touched. Extending `train.max_steps` or `train.epochs` is allowed."""
    from tunekit.config.load import read_yaml

    stored = run.path / "recipe.yaml"
    if not stored.is_file():
        raise TunekitError(f"{stored}: missing; the interrupted run cannot be checked, so it is not resumed")
    old, _ = read_yaml(stored)
    new = recipe.model_dump(mode="json")
    old = type(recipe).model_validate(old).model_dump(mode="json") if _validates(recipe, old) else old
    changed = [k for k in changed_keys(old, new) if not any(k == a or (a.endswith(".") and k.startswith(a))
                                                             for a in RESUMABLE_KEYS)]
    if changed:
        shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in changed[:6])
        raise TunekitError(
            f"{stored}: --resume with a changed recipe: {shown}; only train.max_steps/train.epochs may grow. "
            "Restore these keys, or start a new run (--overwrite)"
        )
    for key in ("max_steps", "epochs"):
        a, b = old.get("train", {}).get(key), new["train"][key]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b < a and not (key == "max_steps" and a < 0):
            raise TunekitError(f"{stored}: --resume may extend train.{key}, not shrink it ({a} -> {b})")


def _validates(recipe: Any, data: dict[str, Any]) -> bool:
    try:
        type(recipe).model_validate(data)
    except ValueError:
        return False
    return True


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node
