"""The data step shared by the stages that learn from preference pairs (rm, dpo): read, normalise, split.

Rows are TRL's conversational preference rows, {prompt: [...], chosen: [assistant turn], rejected: [...],
margin}, tokenized by the TRL trainer itself with the run's tokenizer and chat template.
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages.runner import Stage, StageData


class PreferenceStage(Stage):
    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from datasets import Dataset

        from tunekit.data.preference import fingerprint_rows, split_records, to_preference
        from tunekit.errors import TunekitError

        split = split_records(recipe.data, recipe.train.seed, to_preference)
        if not split.train:
            raise TunekitError("no preference pair left for training (data.max_samples or weights too small)")
        train_rows = [p.as_row() for p in split.train]
        eval_rows = [p.as_row() for p in split.eval]
        with_margin = sum(p.margin is not None for p in split.train)
        counts = {"train_pairs": len(train_rows), "eval_pairs": len(eval_rows), "with_margin": with_margin,
                  "sources": split.sources}
        src = ", ".join(f"{s['path']} x{s['weight']:g} -> {s['used']}" for s in split.sources)
        summary = f"data: {len(train_rows)} train / {len(eval_rows)} eval preference pairs ({src})"
        if with_margin:
            summary += f"; {with_margin} with a margin"
        return StageData(
            Dataset.from_list(train_rows),
            Dataset.from_list(eval_rows) if eval_rows else None,
            fingerprint_rows(train_rows, eval_rows),
            summary,
            counts,
            sample_prompts=[p.prompt for p in split.eval],
            sample_references=[p.chosen[-1]["content"] for p in split.eval],
            extra={"eval_pairs": split.eval},
        )
