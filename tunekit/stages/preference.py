"""The data step shared by the stages that learn from preference pairs (rm, dpo): read, normalise, split.

Rows are TRL's conversational preference rows, {prompt: [...], chosen: [assistant turn], rejected: [...],
margin}, tokenized by the TRL trainer itself with the run's tokenizer and chat template.

TRL drops records that do not fit `max_length` without a word (dpo with keep_start and kto: a prompt that fills
it; rm: a chosen or rejected conversation longer than it). `drop_unfit` applies the same rules to the rows before
the model loads: the drops are counted in the data summary, and a split left empty is the user's error, naming the
data files and data.max_length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunekit.config.schema import Recipe
from tunekit.errors import TunekitError
from tunekit.stages import common
from tunekit.stages.runner import Stage, StageData


def _rows(split: Any) -> tuple[list, list, dict[str, Any], str]:
    with_margin = sum(p.margin is not None for p in split.train)
    return ([p.as_row() for p in split.train], [p.as_row() for p in split.eval], {"with_margin": with_margin},
            f"; {with_margin} with a margin" if with_margin else "")


def _ids(tok: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation as TRL's trainers tokenize it (trl.data_utils._tokenize, conversational)."""
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)["input_ids"])


def prompt_fills(tok: Any, row: dict[str, Any], max_length: int) -> bool:
    """TRL's DPO (keep_start) and KTO rule: the prompt's tokens, i.e. those the templated prompt with its generation
    prompt shares with every prompt + answer, leave no answer token within max_length."""
    head = _ids(tok, row["prompt"], generation_prompt=True)
    if len(head) < max_length:  # the shared prefix is never longer than the prompt alone
        return False
    from trl.data_utils import common_prefix_length

    answers = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
    return min(common_prefix_length(head, _ids(tok, row["prompt"] + a)) for a in answers) >= max_length


def pair_too_long(tok: Any, row: dict[str, Any], max_length: int) -> bool:
    """TRL's reward-model rule: the chosen or the rejected conversation is longer than max_length."""
    return any(len(_ids(tok, row["prompt"] + row[k])) > max_length for k in ("chosen", "rejected"))


#: rule -> (does a row not fit, why it is dropped)
RULES: dict[str, tuple[Callable[[Any, dict[str, Any], int], bool], str]] = {
    "prompt": (prompt_fills, "the prompt alone fills it, leaving no answer token to learn from"),
    "pair": (pair_too_long, "a reward model trains on whole conversations, and one of the pair is longer"),
}


def data_files(recipe: Recipe, split: str) -> str:
    """The data sources a split was read from (the eval split comes from data.train unless data.eval is set)."""
    from tunekit.data.pipeline import as_sources

    spec = recipe.data.eval if split == "eval" and recipe.data.eval is not None else recipe.data.train
    return ", ".join(s.path for s in as_sources(spec, recipe.data.format)) or "data"


def all_dropped(recipe: Recipe, split: str, count: int, unit: str, why: str) -> TunekitError:
    """The error for a split of which no record fits data.max_length."""
    which = "training" if split == "train" else "held-out"
    return TunekitError(f"{data_files(recipe, split)}: all {count} {which} {unit}s were dropped by "
                        f"data.max_length={recipe.data.max_length}: {why}; raise data.max_length or shorten "
                        "the prompts")


def drop_unfit(recipe: Recipe, tok: Any, data: StageData, rule: str, unit: str) -> StageData:
    """Drop the rows of both splits that TRL would drop under `rule` (see RULES); refuse a split left empty."""
    from datasets import Dataset

    does_not_fit, why = RULES[rule]
    n = recipe.data.max_length
    dropped = {"train": 0, "eval": 0}
    for split in ("train", "eval"):
        ds = getattr(data, split)
        if ds is None:
            continue
        rows = list(ds)
        kept = [r for r in rows if not does_not_fit(tok, r, n)]
        if rows and not kept:
            raise all_dropped(recipe, split, len(rows), unit, why)
        dropped[split] = len(rows) - len(kept)
        if dropped[split]:
            setattr(data, split, Dataset.from_list(kept))
    if dropped["train"] or dropped["eval"]:
        data.summary += (f"; dropped {dropped['train']} train / {dropped['eval']} eval {unit}s that do not fit "
                         f"data.max_length={n} ({why})")
    data.counts.update(dropped_too_long=dropped["train"], dropped_too_long_eval=dropped["eval"])
    return data


class PreferenceStage(Stage):
    #: TRL's drop rule for this stage's trainer (RULES), None when it drops nothing
    drop_rule: str | None = None

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        from tunekit.data.preference import to_preference

        data = common.record_data(recipe, to_preference, "preference pair", "pairs", _rows,
                                  lambda p: p.chosen[-1]["content"])
        rule = self.drop_rule_for(recipe)
        return drop_unfit(recipe, tok, data, rule, "preference pair") if rule else data

    def drop_rule_for(self, recipe: Recipe) -> str | None:
        return self.drop_rule
