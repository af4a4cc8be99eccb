"""The PPO loop (Schulman et al. 2017, as applied to LMs by Ziegler et al. 2019 and InstructGPT):
each step = one rollout batch (tunekit.ppo.rollout.collect), then `epochs` passes over shuffled minibatches
minimising L = L_clip(π) + c_v·L_clip(V) − c_H·H, one optimizer step per minibatch, gradients clipped.

Written by hand on torch + accelerate because TRL 1.16 ships no PPO trainer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunekit.ppo import algorithm as alg
from tunekit.ppo.config import PPOConfig
from tunekit.ppo.models import PolicyValue, Reference
from tunekit.ppo.rollout import Experience, RewardFn, collect

STATE = "trainer_state.json"


class PPOTrainer:
    def __init__(
        self,
        model: PolicyValue,
        reference: Reference,
        tok: Any,
        records: list[Any],
        reward_fn: RewardFn,
        cfg: PPOConfig,
        *,
        steps: int,
        lr: float = 1e-5,
        seed: int = 0,
        max_grad_norm: float = 1.0,
        forward_batch: int = 8,
        weight_decay: float = 0.0,
        lr_scheduler: str = "constant",
        warmup_ratio: float = 0.0,
        chat: bool = True,
    ):
        from accelerate import Accelerator
        from transformers import get_scheduler

        if not records:
            raise ValueError("PPO needs at least one prompt")
        self.cfg = cfg
        self.tok = tok
        self.records = records  # prompts, or dicts with a "prompt" key and the rewards' columns
        self.reward_fn = reward_fn
        self.reference = reference
        self.steps = steps
        self.seed = seed
        self.max_grad_norm = max_grad_norm
        self.forward_batch = forward_batch
        self.chat = chat
        self.step_count = 0
        self.kl_ctl = (
            alg.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.target_kl is not None
            else alg.FixedKLController(cfg.kl_coef)
        )
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        minibatches = -(-cfg.rollout_rows // (cfg.minibatch_size or cfg.rollout_rows))
        total_updates = max(1, steps * cfg.epochs * minibatches)
        scheduler = get_scheduler(
            lr_scheduler, optimizer, num_warmup_steps=int(warmup_ratio * total_updates),
            num_training_steps=total_updates,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self._generator = torch.Generator().manual_seed(seed)

    # ---- prompts: an epoch-wise shuffle that depends only on (seed, step), so a resumed run sees the same ones
    def records_for(self, step: int) -> list[Any]:
        n, k = len(self.records), self.cfg.prompts_per_step
        chosen = []
        for j in range(step * k, (step + 1) * k):
            order = list(range(n))
            random.Random(self.seed * 100_003 + j // n).shuffle(order)
            chosen.append(self.records[order[j % n]])
        return chosen

    @property
    def unwrapped(self) -> PolicyValue:
        return self.accelerator.unwrap_model(self.model)

    def step(self) -> dict[str, Any]:
        """One rollout batch and its PPO epochs; returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        exp = collect(
            self.unwrapped, self.reference, self.tok, self.records_for(self.step_count), self.reward_fn, cfg,
            self.kl_ctl.value, self.forward_batch, seed=self.seed * 1_000_003 + self.step_count, chat=self.chat,
        )
        t1 = time.perf_counter()
        stats = self._update(exp)
        t2 = time.perf_counter()
        mask = exp.mask
        kl_per_response = (exp.kl * mask).sum(1).mean().item()
        beta = self.kl_ctl.value
        self.kl_ctl.update(kl_per_response, exp.size)
        self.step_count += 1
        response_tokens = int(mask.sum().item())
        update_tokens = response_tokens * cfg.epochs
        row = {
            "step": self.step_count,
            "reward": exp.raw_scores.mean().item(),
            "reward_std": exp.raw_scores.std().item() if exp.size > 1 else 0.0,
            "score": exp.scores.mean().item(),
            "kl": kl_per_response,
            "kl_coef": beta,
            "non_score_reward": (exp.rewards.sum(1) - exp.scores).mean().item(),
            "response_length": mask.sum(1).mean().item(),
            "truncated_share": (~exp.finished).float().mean().item(),
            "explained_variance": alg.explained_variance(exp.values, exp.returns, mask),
            "value_mean": alg.masked_mean(exp.values, mask).item(),
            "return_mean": alg.masked_mean(exp.returns, mask).item(),
            **stats,
            "lr": self.scheduler.get_last_lr()[0],
            "rollout_seconds": round(t1 - t0, 3),
            "update_seconds": round(t2 - t1, 3),
            "rollout_tokens_per_s": round(response_tokens / max(t1 - t0, 1e-9), 2),
            "update_tokens_per_s": round(update_tokens / max(t2 - t1, 1e-9), 2),
        }
        self.last_experience = exp
        return row

    def _update(self, exp: Experience) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        B = exp.size
        mb_size = cfg.minibatch_size or B
        sums: dict[str, float] = {}
        counts = 0
        norms: list[float] = []
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=self._generator)
            for start in range(0, B, mb_size):
                minibatch = order[start : start + mb_size]
                mb_tokens = exp.mask[minibatch].sum().clamp(min=1.0)
                for micro_start in range(0, len(minibatch), self.forward_batch):
                    idx = minibatch[micro_start : micro_start + self.forward_batch].to(exp.mask.device)
                    m = exp.mask[idx]
                    out = self.model(
                        exp.sequences[idx], exp.attention_mask[idx], exp.prompt_len, cfg.temperature,
                        with_values=True, with_entropy=True,
                    )
                    pol = alg.clipped_policy_loss(out.logprobs, exp.logprobs[idx], exp.advantages[idx], m, cfg.clip_eps)
                    vloss, vclip = alg.clipped_value_loss(
                        out.values.float(), exp.values[idx], exp.returns[idx], m, cfg.value_clip
                    )
                    entropy = alg.masked_mean(out.entropy, m)
                    loss = pol.loss + cfg.vf_coef * vloss - cfg.entropy_coef * entropy
                    # each micro-batch's token mean, weighted to the minibatch's token mean
                    acc.backward(loss * (m.sum() / mb_tokens))
                    for key, value in (
                        ("policy_loss", pol.loss), ("value_loss", vloss), ("entropy", entropy),
                        ("clip_fraction", pol.clip_fraction), ("approx_kl", pol.approx_kl),
                        ("value_clip_fraction", vclip),
                    ):
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                    counts += 1
                if self.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                    norms.append(float(norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        stats = {k: v / max(counts, 1) for k, v in sums.items()}
        if norms:
            stats["grad_norm"] = sum(norms) / len(norms)
        return stats

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None,
              checkpoint: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Run the remaining steps; `on_step(metrics)` after each, `checkpoint(step)` after each too."""
        rows = []
        while self.step_count < self.steps:
            row = self.step()
            rows.append(row)
            if on_step is not None:
                on_step(row)
            if checkpoint is not None:
                checkpoint(self.step_count)
        return rows

    # ---- checkpoints: trainable tensors (adapter or full weights + value head), optimizer, scheduler,
    # KL controller, step and RNG state. Written to a temporary folder, then renamed (a kill leaves the old one).
    def save_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for name, p in self.unwrapped.named_parameters():
            if p.requires_grad and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                tensors[name] = p.detach().contiguous().cpu()
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "generator": self._generator.get_state()}, tmp / "rng.pt")
        state = {"global_step": self.step_count, "kl_controller": self.kl_ctl.state_dict()}
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        tensors = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.unwrapped.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise ValueError(f"checkpoint {folder} does not match the model (e.g. {missing[0]})")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self._generator.set_state(rng["generator"])
        state = json.loads((folder / STATE).read_text())
        self.step_count = int(state["global_step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])

