"""Score preference pairs: reward models (pairwise accuracy), policies (log-prob accuracy), DPO/KTO runs
(implicit-reward accuracy, with the run's own β) and reference-free policies (orpo, simpo; Meng et al., 2024):
r̂(x, y) = log π(y|x) / |y| (cpo: log π(y|x)).

Reward model: accuracy = P[r(x, y_c) > r(x, y_r)], margin = mean(r(x, y_c) − r(x, y_r)).
Any policy: log-prob accuracy = P[log π(y_c|x) > log π(y_r|x)].
DPO run (Rafailov et al., 2023, eq. 5): r̂(x, y) = β (log π(y|x) − log π_ref(y|x));
accuracy = P[r̂(x, y_c) > r̂(x, y_r)].
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from tunekit.data.templates import render

Messages = list[dict[str, str]]


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def conversation_ids(tok: Any, prompt: Messages, completion: Messages, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + completion, index of the first completion token), rendered with the chat
    template; the completion starts where the prompt with its generation prompt ends."""
    head = render(tok, prompt, generation_prompt=True)
    full = render(tok, prompt + completion)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    start = next((i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= len(head)), len(ids))
    if not full.startswith(head):  # template renders the prompt differently inside the conversation
        start = len(tok(head, add_special_tokens=False)["input_ids"])
    return ids[:max_length], min(start, max_length)


def completion_logps(model: Any, tok: Any, prompts: list[Messages], completions: list[Messages],
                     max_length: int = 1024, batch_size: int = 8) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) over each completion's tokens (its end-of-turn token included).

    The per-token log-probs are training's `token_logprobs` on the decoder's hidden states (the head in chunks,
    no batch × length × vocab logits); a model the chunked head cannot take (`causal_lm_parts` None: an adapter
    on lm_head, logit soft-capping) gives them from its full logits.
    """
    import torch

    from tunekit.ppo.algorithm import logprobs_of
    from tunekit.training.loss import IGNORE_INDEX, shift_for_next_token, token_logprobs
    from tunekit.training.trainer import causal_lm_parts, decoder_hidden_states

    rows = [conversation_ids(tok, p, c, max_length) for p, c in zip(prompts, completions)]
    out: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.eval()
    parts = causal_lm_parts(model)
    dev = _device(model)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # completion tokens only
        for j, (row, start) in enumerate(chunk):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
            labels[j, start : len(row)] = ids[j, start : len(row)]
        inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        labels = labels.to(dev)
        with torch.no_grad():
            if parts is not None:
                hidden, _ = decoder_hidden_states(model, parts[0], inputs)
                h, y = shift_for_next_token(hidden, labels)
                logp = token_logprobs(h, parts[1].weight, y, bias=parts[1].bias)
            else:
                y = labels[:, 1:]
                logp = logprobs_of(model(**inputs).logits[:, :-1], y.clamp(min=0)) * (y != IGNORE_INDEX)
        out.extend(logp.sum(dim=1).tolist())
    return out


def reward_pair_scores(model: Any, tok: Any, pairs: list[Any], max_length: int = 1024,
                       batch_size: int = 8) -> list[tuple[float, float]]:
    """(r(x, y_c), r(x, y_r)) for each pair, from a one-output sequence-classification model."""
    from tunekit.rewards.reward_model import reward_scores

    chosen = reward_scores(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], batch_size, max_length)
    rejected = reward_scores(model, tok, [p.prompt for p in pairs], [p.rejected for p in pairs], batch_size,
                             max_length)
    return list(zip(chosen, rejected))


def reward_model_accuracy(model: Any, tok: Any, pairs: list[Any], max_length: int = 1024) -> dict[str, Any]:
    scores = reward_pair_scores(model, tok, pairs, max_length)
    diffs = [c - r for c, r in scores]
    return {"n": len(pairs), "pairwise_accuracy": sum(d > 0 for d in diffs) / max(len(diffs), 1),
            "mean_margin": sum(diffs) / max(len(diffs), 1), "margins": diffs}


def _pair_logps(model: Any, tok: Any, pairs: list[Any], max_length: int) -> tuple[list[float], list[float]]:
    prompts = [p.prompt for p in pairs]
    return (completion_logps(model, tok, prompts, [p.chosen for p in pairs], max_length),
            completion_logps(model, tok, prompts, [p.rejected for p in pairs], max_length))


def logprob_accuracy(model: Any, tok: Any, pairs: list[Any], max_length: int = 1024) -> dict[str, Any]:
    """P[log π(y_c|x) > log π(y_r|x)]: how often the model itself finds the chosen answer likelier; and the mean
    log-prob margin E[log π(y_c|x) − log π(y_r|x)] (it moves when the accuracy is at its ceiling)."""
    c, r = _pair_logps(model, tok, pairs, max_length)
    n = max(len(pairs), 1)
    return {"n": len(pairs), "logprob_accuracy": sum(a > b for a, b in zip(c, r)) / n,
            "mean_logprob_margin": sum(a - b for a, b in zip(c, r)) / n,
            "logprob_margins": [a - b for a, b in zip(c, r)]}


def dpo_accuracy(model: Any, tok: Any, pairs: list[Any], beta: float, reference: Any = None,
                 max_length: int = 1024, reference_context: Any = None) -> dict[str, Any]:
    """Implicit-reward preference accuracy of a policy (and its log-prob accuracy). `reference` None: the PEFT
    model with its adapter disabled, or under `reference_context` (e.g. a trainer's frozen "ref" adapter)."""

    def logps(m: Any, which: str) -> list[float]:
        comps = [getattr(p, which) for p in pairs]
        return completion_logps(m, tok, [p.prompt for p in pairs], comps, max_length)

    pol_c, pol_r = logps(model, "chosen"), logps(model, "rejected")
    ctx = reference_context or (model.disable_adapter() if reference is None else nullcontext())
    with ctx:
        ref = model if reference is None else reference
        ref_c, ref_r = logps(ref, "chosen"), logps(ref, "rejected")
    r_c = [beta * (a - b) for a, b in zip(pol_c, ref_c)]
    r_r = [beta * (a - b) for a, b in zip(pol_r, ref_r)]
    margins = [c - r for c, r in zip(r_c, r_r)]
    n = max(len(margins), 1)
    return {"n": len(pairs), "implicit_reward_accuracy": sum(m > 0 for m in margins) / n,
            "logprob_accuracy": sum(a > b for a, b in zip(pol_c, pol_r)) / n,
            "mean_logprob_margin": sum(a - b for a, b in zip(pol_c, pol_r)) / n,
            "mean_reward_margin": sum(margins) / n, "chosen_reward": sum(r_c) / n, "rejected_reward": sum(r_r) / n,
            "logprob_margins": [a - b for a, b in zip(pol_c, pol_r)], "reward_margins": margins}


def reference_free_accuracy(model: Any, tok: Any, pairs: list[Any], length_normalised: bool = True,
                            max_length: int = 1024) -> dict[str, Any]:
    """Preference accuracy P[r̂(x, y_c) > r̂(x, y_r)] of a reference-free policy, r̂ = per-token mean log-prob
    (SimPO's reward; ORPO's log odds rank the same way) or, with `length_normalised` False, the summed log-prob
    (CPO's); and the mean reward margin."""
    c, r = _pair_logps(model, tok, pairs, max_length)
    if length_normalised:
        def tokens(p: Any, which: str) -> int:
            ids, start = conversation_ids(tok, p.prompt, getattr(p, which), max_length)
            return max(len(ids) - start, 1)

        c = [v / tokens(p, "chosen") for v, p in zip(c, pairs)]
        r = [v / tokens(p, "rejected") for v, p in zip(r, pairs)]
    n = max(len(pairs), 1)
    return {"n": len(pairs), "preference_accuracy": sum(a > b for a, b in zip(c, r)) / n,
            "reward": "mean token log-prob" if length_normalised else "summed log-prob",
            "mean_reward_margin": sum(a - b for a, b in zip(c, r)) / n,
            "reward_margins": [a - b for a, b in zip(c, r)]}
