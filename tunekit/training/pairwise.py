"""Reference-free pairwise preference losses (ORPO, SimPO, CPO) and the Trainer that computes them.

With s(y) = Σ_t log π(y_t | x, y_<t) over the answer's tokens and m(y) = s(y) / |y| (per-token mean):

- ORPO (Hong et al., 2024, arXiv:2403.07691): L = NLL(y_c) + λ · −log σ(log odds(y_c) − log odds(y_r)),
  log odds(y) = m(y) − log(1 − exp m(y)).
- SimPO (Meng et al., 2024, arXiv:2405.14734): L = −log σ(β m(y_c) − β m(y_r) − γ).
- CPO (Xu et al., 2024, arXiv:2401.08417): L = −log σ(β s(y_c) − β s(y_r)) + α · NLL(y_c).

NLL(y_c) = −Σ s(y_c) / Σ |y_c| over the batch (the causal-LM loss on the chosen answers, token mean). Each loss is
the mean over the pairs of the batch.

Why written here and not taken from TRL: TRL 1.16 ships ORPOTrainer and CPOTrainer (SimPO is its `loss_type`)
only under `trl.experimental`, an API that may move or vanish in a minor release, while tunekit promises that a
method it has stays. Each loss is a few lines over the per-sequence log-probs that tunekit's chunked head already
computes (`training/loss.py`: only answer tokens go through the LM head, no batch x length x vocab logits), so
the trainer below is the plain transformers Trainer with one `compute_loss`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from tunekit.training.loss import IGNORE_INDEX, shift_for_next_token, token_logprobs
from tunekit.training.trainer import causal_lm_parts, decoder_hidden_states


@dataclass
class PairLogps:
    """Per-pair summed log-probs s(y) and answer lengths |y| of the chosen and the rejected answers."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    def nll(self) -> torch.Tensor:
        """NLL(y_c): −Σ s(y_c) / Σ |y_c| (token mean over the batch's chosen answers)."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) with log p = `mean_logp` < 0; log(1 − p) = log(−expm1(log p)) stays finite near p = 1."""
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo_loss(lp: PairLogps, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = NLL(y_c) − λ · mean log σ(log odds(y_c) − log odds(y_r))."""
    ratio = log_odds(lp.chosen_mean) - log_odds(lp.rejected_mean)
    nll = lp.nll()
    odds_term = -F.logsigmoid(ratio).mean()
    return nll + lam * odds_term, {"nll": nll, "log_odds_ratio": ratio.mean(), "odds_ratio_loss": odds_term,
                                   "rewards/chosen": lp.chosen_mean, "rewards/rejected": lp.rejected_mean}


def simpo_loss(lp: PairLogps, beta: float, gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −mean log σ(β m(y_c) − β m(y_r) − γ)."""
    r_c, r_r = beta * lp.chosen_mean, beta * lp.rejected_mean
    return -F.logsigmoid(r_c - r_r - gamma).mean(), {"rewards/chosen": r_c, "rewards/rejected": r_r}


def cpo_loss(lp: PairLogps, beta: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = −mean log σ(β s(y_c) − β s(y_r)) + α · NLL(y_c)."""
    r_c, r_r = beta * lp.chosen, beta * lp.rejected
    nll = lp.nll()
    return -F.logsigmoid(r_c - r_r).mean() + alpha * nll, {"nll": nll, "rewards/chosen": r_c, "rewards/rejected": r_r}


@dataclass
class PairCollator:
    """Rows {chosen_ids, chosen_start, rejected_ids, rejected_start} → one right-padded batch of 2B sequences
    (the B chosen first, then the B rejected) with labels on the answer tokens only."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [(r["chosen_ids"], r["chosen_start"]) for r in rows] + [(r["rejected_ids"], r["rejected_start"])
                                                                       for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, start) in enumerate(seqs):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
            labels[i, start : len(row)] = ids[i, start : len(row)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_logps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], parts: Any = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log π(y_t|x, y_<t), answer token count) per row: labelled tokens only, through the chunked head
    when `parts` = causal_lm_parts(model), else from the model's full logits."""
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if parts is not None:
        hidden, _ = decoder_hidden_states(model, parts[0], model_inputs)
        h, y = shift_for_next_token(hidden, labels)
        logp = token_logprobs(h, parts[1].weight, y, bias=parts[1].bias)
    else:
        logits = model(**model_inputs).logits[:, :-1].float()
        y = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != IGNORE_INDEX)
    return logp.sum(dim=1), (y != IGNORE_INDEX).sum(dim=1)


def pair_logps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], parts: Any = None) -> PairLogps:
    """PairLogps of a PairCollator batch (first half chosen, second half rejected)."""
    sums, lens = sequence_logps(model, inputs, parts)
    b = sums.shape[0] // 2
    return PairLogps(sums[:b], sums[b:], lens[:b], lens[b:])


class PairwiseTrainer(Trainer):
    """transformers Trainer whose loss is `loss_fn(PairLogps) -> (loss, metrics)` over PairCollator batches.

    Logs the loss terms, rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies
    (P[reward(y_c) > reward(y_r)], the held-out preference accuracy at evaluation).
    """

    def __init__(self, *args: Any, loss_fn: Any, loss_impl: str = "chunked", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self._parts = causal_lm_parts(self.model) if loss_impl == "chunked" else None
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: the Trainer divides by grad_accum
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from tunekit.launch import ranks

        parts = None if ranks.zero3_partitioned(model) else self._parts  # ZeRO-3 gathers lm_head in its forward
        lp = pair_logps(model, inputs, parts)
        loss, terms = self.loss_fn(lp)
        mode = "train" if model.training else "eval"
        logged = self._metrics[mode]
        with torch.no_grad():
            for k, v in terms.items():
                logged[k].append(float(v.float().mean()))
            if "rewards/chosen" in terms:
                margin = terms["rewards/chosen"] - terms["rewards/rejected"]
                logged["rewards/margins"].append(float(margin.float().mean()))
                logged["rewards/accuracies"].append(float((margin > 0).float().mean()))
            logged["logps/chosen"].append(float(lp.chosen.float().mean()))
            logged["logps/rejected"].append(float(lp.rejected.float().mean()))
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        averaged = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        logs.update({f"eval_{k}": v for k, v in averaged.items()} if mode == "eval" else averaged)
        self._metrics[mode].clear()
        super().log(logs, start_time)
