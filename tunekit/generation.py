"""Batched sampling for RL and AI-feedback stages (grpo, ppo, cai) and evaluation.

Prompts are left-padded so every row's last prompt token sits in the same column and the KV cache of one
`generate` call serves the whole batch; each response is cut after its first EOS (y = y_1..y_k with y_k = EOS,
or k = max_new_tokens and the row is `finished=False`, i.e. truncated). Greedy when temperature is 0, else
nucleus sampling (Holtzman et al., 2020) with `top_p`. vLLM is used when it is installed and a GPU is present
(`backend="auto"`), else transformers' `generate`. vLLM serves the model folder the model was loaded from,
so a caller whose weights change while it samples (ppo) passes `backend="transformers"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunekit.data.templates import render

Messages = list[dict[str, str]]


@dataclass
class Rollout:
    """Responses of a batch of prompts, as tensors ready for log-prob passes, plus their decoded text."""

    prompt_ids: Any  # (B, P) left-padded prompts; B = len(prompts) * num_samples
    prompt_mask: Any  # (B, P) 1 on real prompt tokens
    response_ids: Any  # (B, T) right-padded with pad_token_id after the first EOS
    response_mask: Any  # (B, T) 1 on response tokens up to and including the first EOS
    finished: Any  # (B,) bool: the response ended with EOS (not truncated)
    texts: list[str]  # decoded responses, special tokens skipped
    prompt_index: list[int]  # which prompt each row came from (rows of one prompt are consecutive)

    @property
    def sequences(self) -> Any:
        """(B, P + T) prompt followed by response."""
        import torch

        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Any:
        import torch

        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def prompt_text(tok: Any, prompt: str | Messages, chat: bool = True) -> str:
    """A message list rendered with the chat template and the generation prompt; a string as one user turn."""
    if isinstance(prompt, str):
        if not chat:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return render(tok, prompt, generation_prompt=True)


def eos_ids(model: Any, tok: Any) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return sorted(ids)


def _cut_at_eos(rows: Any, eos: list[int], pad_id: int):
    """(response_ids padded after the first EOS, response_mask through the first EOS, finished)."""
    import torch

    is_eos = torch.zeros_like(rows, dtype=torch.bool)
    for e in eos:
        is_eos |= rows == e
    finished = is_eos.any(dim=1)
    # position of the first EOS (or T-1 when none): everything after it is padding
    last = torch.full(finished.shape, rows.shape[1] - 1, dtype=torch.long)
    first = torch.where(finished, is_eos.float().argmax(dim=1), last)
    cols = torch.arange(rows.shape[1]).unsqueeze(0)
    mask = (cols <= first.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), rows, torch.full_like(rows, pad_id))
    return ids, mask, finished


def sample(
    model: Any,
    tok: Any,
    prompts: list[str | Messages],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int | None = None,
    chat: bool = True,
    backend: str = "auto",
) -> Rollout:
    """Sample `num_samples` responses per prompt (greedy when temperature == 0); see `Rollout`."""
    import torch

    if backend == "auto":
        backend = "vllm" if _vllm_usable() else "transformers"
    texts = [prompt_text(tok, p, chat) for p in prompts]
    expanded = [t for t in texts for _ in range(num_samples)]
    index = [i for i in range(len(texts)) for _ in range(num_samples)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = eos_ids(model, tok)
    if seed is not None:
        torch.manual_seed(seed)

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(expanded, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    if backend == "vllm":
        responses = _vllm_generate(model, tok, expanded, max_new_tokens, temperature, top_p, seed)
    else:
        responses = _hf_generate(
            model, enc, batch_size, max_new_tokens, temperature, top_p, pad_id, eos
        )
    width = max((len(r) for r in responses), default=0) or 1
    rows = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        rows[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses])
    rows_ids, mask, finished = _cut_at_eos(rows, eos, pad_id)
    mask = mask * (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    decoded = [
        tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True).strip() for ids, m in zip(rows_ids, mask)
    ]
    return Rollout(enc["input_ids"], enc["attention_mask"], rows_ids, mask, finished, decoded, index)


def _hf_generate(model, enc, batch_size, max_new_tokens, temperature, top_p, pad_id, eos) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos,
                                  use_cache=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    try:
        for i in range(0, enc["input_ids"].shape[0], batch_size):
            ids = enc["input_ids"][i : i + batch_size].to(device)
            att = enc["attention_mask"][i : i + batch_size].to(device)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=att, **kwargs)
            out.extend(row.tolist() for row in gen[:, ids.shape[1] :].cpu())
    finally:
        model.train(was_training)
    return out


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


_VLLM_ENGINES: dict[int, Any] = {}


def _vllm_generate(model, tok, texts, max_new_tokens, temperature, top_p, seed) -> list[list[int]]:
    """vLLM on a GPU: an engine over the model's saved folder (weights synced by the caller's stage)."""
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    key = id(model)
    if key not in _VLLM_ENGINES:
        path = getattr(model, "name_or_path", None) or model.config._name_or_path
        _VLLM_ENGINES[key] = LLM(model=path, tokenizer=path, gpu_memory_utilization=0.3, seed=seed or 0)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    outs = _VLLM_ENGINES[key].generate(texts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
