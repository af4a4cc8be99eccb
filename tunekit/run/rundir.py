"""A run directory: `<output>.partial/` while working, renamed to `<output>/` when complete.

Layout: recipe.yaml (resolved), run_card.json, metrics.jsonl, loss.png, checkpoints/, adapter/ or model/,
samples.jsonl. An interrupted run stays at `.partial` and `--resume` continues it from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.launch import ranks
from tunekit.run.atomic import commit, partial_path


def default_output(stage: str) -> Path:
    return Path("runs") / f"{stage}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, final: Path, work: Path, resuming: bool):
        self.final = final
        self.path = work
        self.resuming = resuming

    @classmethod
    def prepare(cls, output: str | Path, overwrite: bool = False, resume: bool = False) -> RunDir:
        """Check the output before any work; nothing is created until `create()` (after data and model load)."""
        final = Path(output)
        work = partial_path(final)
        if not ranks.is_main():  # rank 0 checks and writes; the others follow it
            return cls(final, work, resume)
        if resume:
            if not work.is_dir():
                if final.is_dir():
                    raise TunekitError(f"run '{final}' is already complete; nothing to resume")
                raise TunekitError(f"no interrupted run at '{work}' to resume")
            if final.exists() and not overwrite:
                raise TunekitError(f"output '{final}' already exists; pass --overwrite to replace it on completion")
            return cls(final, work, True)
        if final.exists() and not overwrite:
            raise TunekitError(f"output '{final}' already exists; pass --overwrite to replace it")
        if work.exists() and not overwrite:
            raise TunekitError(
                f"an interrupted run exists at '{work}'; pass --resume to continue it or --overwrite to restart"
            )
        return cls(final, work, False)

    def create(self) -> None:
        """Make the `.partial` folder (a fresh one unless resuming; --overwrite discards an interrupted one)."""
        if not self.resuming and ranks.is_main():
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        ranks.barrier()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        found = [p for p in self.checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
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

    def finish(self) -> Path:
        """Rename `.partial` to the final name (replacing an old run only now, with --overwrite); rank 0 only."""
        ranks.barrier()
        if not ranks.is_main():
            return self.final
        return commit(self.path, self.final)
