"""The data step shared by the stages that learn from preference pairs (rm, dpo): read, normalise, split.

Rows are TRL's conversational preference rows, {prompt: [...], chosen: [assistant turn], rejected: [...],
margin}, tokenized by the TRL trainer itself with the run's tokenizer and chat template.
"""

from __future__ import annotations

from typing import Any

from tunekit.config.schema import Recipe
from tunekit.stages import common
from tunekit.stages.runner import Stage, StageData


def _rows(split: Any) -> tuple[list, list, dict[str, Any], str]:
    with_margin = sum(p.margin is not None for p in split.train)
    return ([p.as_row() for p in split.train], [p.as_row() for p in split.eval], {"with_margin": with_margin},
            f"; {with_margin} with a margin" if with_margin else "")


class PreferenceStage(Stage):
    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from tunekit.data.preference import to_preference

        return common.record_data(recipe, to_preference, "preference pair", "pairs", _rows,
                                  lambda p: p.chosen[-1]["content"])
