"""`reward_model`: score (prompt, completion) pairs with a `tunekit rm` run — r(x, y) of a Bradley-Terry reward
model (Ouyang et al., 2022). The RM has its own tokenizer: the conversation is rendered with the RM's chat
template and re-tokenised, so the policy and the RM may use different vocabularies.

An rm run: `recipe.yaml` (stage: rm, model.name = the backbone) and either `adapter/` (a PEFT SEQ_CLS adapter whose
`score` head is in modules_to_save, with the tokenizer) or `model/` (a full AutoModelForSequenceClassification
with num_labels=1 and its tokenizer). A plain sequence-classification model folder works too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.rewards.registry import register_reward
from tunekit.rewards.text import as_messages, completion_text


def _recipe_stage(run: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return data.get("stage") if isinstance(data, dict) else None


def load_reward_model(path: str | Path, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a reward model: an rm run directory, its adapter folder, or a model folder.
    The model is in eval mode on `device` (default: the training device)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunekit.models.load import device_type, fix_pad_token, load_model, resolve_model_path
    from tunekit.run.locate import locate

    loc = locate(path)
    if loc is None:
        raise TunekitError(f"reward model '{path}' is not a folder (give a `tunekit rm` run directory)")
    if loc.run_dir is not None and _recipe_stage(loc.run_dir) not in (None, "rm"):
        raise TunekitError(f"'{loc.run_dir}' is a {_recipe_stage(loc.run_dir)} run, not a reward model (stage: rm)")
    dtype = dtype or torch.float32
    common = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    if loc.model_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(loc.model_dir))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(loc.model_dir), **common)
        except (OSError, ValueError) as exc:
            raise TunekitError(f"cannot load reward model '{loc.model_dir}': {str(exc).splitlines()[0]}") from None
    else:
        adapter = loc.adapter_dir
        config_file = adapter / "adapter_config.json"
        if not config_file.is_file():
            raise TunekitError(f"reward model adapter '{adapter}' is not a PEFT adapter (adapter_config.json)")
        task = json.loads(config_file.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise TunekitError(f"'{adapter}' is a {task} adapter; a reward model adapter has task_type SEQ_CLS")
        if loc.base is None:
            raise TunekitError(f"reward model adapter '{adapter}' does not name its base model")
        from peft import PeftModel

        tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else resolve_model_path(loc.base.name)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        # the base may itself be an earlier run (rm on an sft run): load_model folds that chain in memory
        base = load_model(loc.base.model_copy(update={"dtype": str(dtype).removeprefix("torch.")}), tok,
                          task="seq_cls")
        model = PeftModel.from_pretrained(base, str(adapter))
    fix_pad_token(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.to(device or device_type())
    model.eval()
    return model, tok


def render_pairs(tok: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
    """Each (prompt, completion) as the text the RM reads: its chat template, or prompt + completion."""
    texts = []
    for prompt, completion in zip(prompts, completions):
        if getattr(tok, "chat_template", None):
            texts.append(tok.apply_chat_template(as_messages(prompt, completion), tokenize=False))
        else:
            head = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in as_messages(prompt, "")[:-1])
            texts.append(head + completion_text(completion))
    return texts


def reward_scores(model: Any, tok: Any, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int = 8,
                  max_length: int | None = 1024) -> list[float]:
    """r(x, y) for each pair: the RM's scalar output at the last non-padding token, in batches."""
    import torch

    texts = render_pairs(tok, prompts, completions)
    device = next(model.parameters()).device
    scores: list[float] = []
    special = not getattr(tok, "chat_template", None)  # a template already writes its own BOS
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=special,
                        truncation=max_length is not None, max_length=max_length)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            scores += [float(x) for x in logits[:, 0].float().cpu()]
    return scores


@register_reward("reward_model")
def reward_model(path: str, batch_size: int = 8, max_length: int = 1024):
    """Build the reward; the model is loaded at the first call (not when the recipe is read), but a path that
    does not exist is refused here, before any work."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not Path(str(path)).expanduser().exists():
        raise ValueError(f"reward model '{path}' does not exist (give a `tunekit rm` run)")
    state: dict = {}
    lock = threading.Lock()

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        with lock:
            if "model" not in state:
                state["model"], state["tok"] = load_reward_model(path)
        return reward_scores(state["model"], state["tok"], prompts, completions, batch_size, max_length)

    reward.__name__ = "reward_model"
    return reward
