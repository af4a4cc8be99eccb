"""Output tokenizer and vocabulary alignment for `tokenizer_source` / `tokenizer:` merges, and `chat_template`.

As mergekit 0.1.5 (`mergekit/tokenizer/build.py`, `embed.py`), written here because no library does it: the
output vocabulary is the base's ('base'), a model's, or the union of every model's ('union': the base tokenizer
plus, as added tokens, each other model's tokens it lacks, then their added tokens), plus `tokenizer.tokens`.
Every vocabulary tensor (`embed_tokens`, `lm_head`, axis 0) of every model is re-indexed to the output vocabulary
before the merge method sees it. A token missing from a model gets, in that model's copy:
the `tokens:` entry's source if given (a model's row for the token, a model's given token, or zeros); else, if only
one model has it, that model's row; else the base's row if the base has it; else the mean of the rows of the models
that have it; a token no model has is zero. With `force: true` the rule replaces the token's rows in every model.
Rows added by `pad_to_multiple_of` are the mean of the real rows (Hewitt 2021, "Initializing new word embeddings").
The tokenizer is loaded with transformers (`trust_remote_code` off) and saved with `save_pretrained`.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunekit.errors import TunekitError

if TYPE_CHECKING:
    from tunekit.merge.config import MergeConfig
    from tunekit.merge.plan import TensorPlan
    from tunekit.merge.sources import ModelSource

#: tensors indexed by token along axis 0 (mergekit's vocabulary_axis 0 for Llama-style models).
VOCAB_RE = re.compile(r"(embed_tokens|wte|embed_in|word_embeddings|lm_head|embed_out)\.weight$")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


def check_chat_template(value: str, where: str) -> None:
    """`auto`, a named template (chatml) or a Jinja template string; anything else is a TunekitError."""
    if value == "auto" or value in NAMED_TEMPLATES:
        return
    if len(value) < 20 or "{" not in value:
        raise TunekitError(
            f"{where}: chat_template '{value}' is not 'auto', a known name ({', '.join(NAMED_TEMPLATES)}) or a "
            "Jinja template"
        )


def _load_tokenizer(path: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, use_fast=True)
    except Exception as exc:  # noqa: BLE001 - a missing/broken tokenizer is a user-facing error
        raise TunekitError(f"model '{label}': cannot load its tokenizer for the tokenizer merge ({exc})") from None


def _vocab_size(src: ModelSource, tokenizer: Any) -> int:
    cfg_file = src.path / "config.json"
    if cfg_file.is_file():
        value = json.loads(cfg_file.read_text()).get("vocab_size")
        if isinstance(value, int):
            return value
    return len(tokenizer.get_vocab())


def _union(base: Any, tokenizers: dict[str, Any], sizes: dict[str, int]) -> Any:
    """mergekit's `build_union_tokenizer`: the base tokenizer + missing tokens + added tokens, first setting wins."""
    from transformers import AutoTokenizer

    vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for name, tok in tokenizers.items():
        added_here = {info.content for info in tok.added_tokens_decoder.values()}
        for token, idx in tok.get_vocab().items():
            if idx < sizes[name] and token not in added_here and token not in vocab:
                vocab[token] = len(vocab)
        for idx, info in tok.added_tokens_decoder.items():
            if idx < sizes[name] and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base tokenizer object is not mutated
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, use_fast=True)
    base_vocab = base.get_vocab()
    for token in vocab:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabularyPlan:
    """The output tokenizer and, per model, the row of each output token in that model's vocabulary (-1: none)."""

    tokenizer: Any
    vocab: dict[str, int]  # output token -> id
    vocab_size: int  # rows of the output vocabulary tensors (padded to pad_to_multiple_of)
    rows: dict[str, list[int]]  # model ref -> row per output id
    original: dict[str, dict[str, int]]  # model ref -> its own vocabulary
    tokens: dict[str, Any]  # tokenizer.tokens entries (TokenEmbedding)
    base: str | None

    def touches(self, plan: TensorPlan) -> bool:
        return plan.spec is not None and bool(VOCAB_RE.search(plan.name)) and len(plan.shape) >= 1

    def adapt(self, plan: TensorPlan) -> TensorPlan:
        if not self.touches(plan):
            return plan
        return replace(plan, shape=(self.vocab_size, *plan.shape[1:]))

    def readers(self, plan: TensorPlan) -> list[Callable[..., Any]]:
        aligned = self.align(plan)

        def reader(i: int) -> Callable[..., Any]:
            return lambda rows: (aligned[i] if rows is None else aligned[i][rows[0] : rows[1]]).clone()

        return [reader(i) for i in range(len(aligned))]

    def align(self, plan: TensorPlan) -> list[Any]:
        """Every input's vocabulary tensor re-indexed to the output vocabulary (float32), as mergekit."""
        import torch

        models = [src.ref for src, _ in plan.sources]
        tensors = {src.ref: src.read(name, dtype=torch.float32) for src, name in plan.sources}
        configs = dict(self.tokens)
        average: set[str] = set()
        for token, tid in self.vocab.items():  # mergekit's assign_embedding_sources
            if token in configs:
                continue
            present = [m for m in models if self.rows[m][tid] >= 0]
            if len(present) == len(models):
                continue
            if len(present) == 1:
                configs[token] = ("model", present[0])
            elif not present:
                configs[token] = ("zero",)
            elif self.base in models and self.rows[self.base][tid] >= 0:
                configs[token] = ("model", self.base)
            else:
                average.add(token)
        width = tensors[models[0]].shape[1:]
        defaults: dict[int, Any] = {}
        forced: set[int] = set()
        for token, tid in self.vocab.items():
            rule = configs.get(token)
            force = bool(getattr(rule, "force", False))
            if force:
                forced.add(tid)
            if not force and all(self.rows[m][tid] >= 0 for m in models):
                continue
            if token in average:
                present = [tensors[m][self.rows[m][tid]] for m in models if self.rows[m][tid] >= 0]
                defaults[tid] = torch.stack(present).mean(dim=0)
            elif rule is not None:
                defaults[tid] = self._rule_row(rule, token, tid, tensors, width, plan.name)
        out = []
        for m in models:
            new = torch.zeros((self.vocab_size, *width), dtype=torch.float32)
            row_ids = torch.tensor(self.rows[m])
            keep = row_ids >= 0
            if forced:
                keep[list(forced)] = False
            new[: len(row_ids)][keep] = tensors[m][row_ids[keep]]
            for tid, row in defaults.items():
                if not (self.rows[m][tid] >= 0 and tid not in forced):
                    new[tid] = row
            if self.vocab_size > len(self.vocab):
                new[len(self.vocab) :] = new[: len(self.vocab)].mean(dim=0)
            out.append(new)
        return out

    def _rule_row(self, rule: Any, token: str, tid: int, tensors: dict[str, Any], width: Any, tensor: str) -> Any:
        import torch

        if isinstance(rule, tuple):  # implicit rules from assign_embedding_sources
            if rule[0] == "zero":
                return torch.zeros(width)
            return tensors[rule[1]][self.rows[rule[1]][tid]]
        src = rule.source
        if src is None:
            return torch.zeros(width)
        if isinstance(src, dict) and src.get("kind") == "zero":
            return torch.zeros(width)
        model = src["model"] if isinstance(src, dict) else src
        if model not in tensors:
            raise TunekitError(f"token '{token}': its embedding source '{model}' is not an input of '{tensor}'")
        if isinstance(src, dict):  # model_token
            row = src.get("token_id")
            if row is None:
                if src["token"] not in self.original[model]:
                    raise TunekitError(f"token '{src['token']}' is not in the vocabulary of model '{model}'")
                row = self.original[model][src["token"]]
            if not 0 <= row < tensors[model].shape[0]:
                raise TunekitError(f"token id {row} is out of range for model '{model}' ('{tensor}')")
            return tensors[model][row]
        if self.rows[model][tid] < 0:
            raise TunekitError(f"token '{token}' is not in the vocabulary of model '{model}'")
        return tensors[model][self.rows[model][tid]]

    def save_tokenizer(self, out: Path) -> None:
        self.tokenizer.save_pretrained(str(out))


def plan_vocabulary(
    cfg: MergeConfig, sources: dict[str, ModelSource], plans: list[TensorPlan]
) -> VocabularyPlan | None:
    """Build the output tokenizer and per-model row maps; None when every model already has the output vocabulary
    (then the tokenizer files are copied as they are). Raises before anything is written."""
    block = cfg.tokenizer_plan()
    assert block is not None
    names = cfg.model_names()
    base = cfg.base_model or names[0]
    tokenizers = {n: _load_tokenizer(sources[n].path, n) for n in names}
    sizes = {n: _vocab_size(sources[n], tokenizers[n]) for n in names}
    if block.source == "union":
        out_tok = _union(tokenizers[base], tokenizers, sizes)
    elif block.source == "base":
        out_tok = _load_tokenizer(sources[base].path, base)
    else:
        out_tok = _load_tokenizer(sources[block.source].path, block.source)
    for token in block.tokens or {}:
        if token not in out_tok.get_vocab():
            out_tok.add_tokens(token)
    vocab = out_tok.get_vocab()
    size = len(vocab)
    if block.pad_to_multiple_of and size % block.pad_to_multiple_of:
        size += block.pad_to_multiple_of - size % block.pad_to_multiple_of
    rows = {}
    for n in names:
        own = tokenizers[n].get_vocab()
        row = [-1] * len(vocab)
        for token, tid in vocab.items():
            idx = own.get(token, -1)
            row[tid] = idx if idx < sizes[n] else -1
        rows[n] = row
    identity = list(range(len(vocab)))
    vocab_plans = [p for p in plans if p.spec is not None and VOCAB_RE.search(p.name)]
    if (
        not block.tokens
        and size == len(vocab)
        and all(rows[n] == identity for n in names)
        and all(src.info(name).shape[0] == size for p in vocab_plans for src, name in p.sources)
    ):
        return None
    for p in vocab_plans:
        for src, name in p.sources:
            if src.info(name).shape[0] < max(rows[src.ref], default=-1) + 1:
                raise TunekitError(f"model '{src.ref}': '{name}' has fewer rows than its tokenizer's vocabulary")
    return VocabularyPlan(
        out_tok,
        vocab,
        size,
        rows,
        {n: tokenizers[n].get_vocab() for n in names},
        dict(block.tokens or {}),
        base,
    )


def _template_of(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(value, dict):
            value = value.get("default")
        if isinstance(value, list):
            value = next((e.get("template") for e in value if e.get("name") == "default"), None)
        return value if isinstance(value, str) else None
    return None


def set_chat_template(out: Path, cfg: MergeConfig, sources: dict[str, ModelSource], log: Callable[[str], None]) -> None:
    """Write `chat_template` into the output tokenizer: 'auto' = the most common template among the inputs."""
    value = cfg.chat_template
    assert value
    if value == "auto":
        found = [t.strip() for t in (_template_of(src.path) for src in sources.values()) if t]
        if not found:
            log("chat_template: auto: no input model has a chat template; the tokenizer's is kept")
            return
        template = Counter(found).most_common(1)[0][0]
    else:
        template = NAMED_TEMPLATES.get(value, value)
    tok_cfg = out / "tokenizer_config.json"
    if not tok_cfg.is_file():
        log("chat_template: the output has no tokenizer_config.json; the template is written to chat_template.jinja")
    else:
        data = json.loads(tok_cfg.read_text())
        data.pop("chat_template", None)
        tok_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.json").unlink(missing_ok=True)
    (out / "chat_template.jinja").write_text(template)
