"""The plain-library baseline for bench/sft_throughput.py: TRL's SFTTrainer with its defaults + LoRA.

Prints one JSON line: tokens (non-padding, counted in the collator), seconds (training loop), padding_share.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.seconds = time.perf_counter() - self.t0


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--model", "--data", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="SFTConfig's own default: bf16 autocast over fp32 weights")
    ap.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the model is loaded in (a user who knows to load the bf16 checkpoint as bf16)")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.weights_dtype))
    ds = load_dataset("json", data_files=args.data, split="train")
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                           "completion": [{"role": "assistant", "content": r["completion"]}]})
    cfg = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                    max_length=args.max_length, packing=args.packing, learning_rate=2e-4, logging_steps=1,
                    save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
                    disable_tqdm=True, bf16=args.bf16)
    timer = Timer()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[timer])
    counts = {"real": 0, "total": 0}
    inner = trainer.data_collator

    def counting(features):
        batch = inner(features)
        if "attention_mask" in batch and not args.packing:
            counts["real"] += int(batch["attention_mask"].sum())
        else:
            counts["real"] += int(batch["input_ids"].numel())
        counts["total"] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    print(json.dumps({"tokens": counts["real"], "seconds": timer.seconds,
                      "padding_share": 1 - counts["real"] / counts["total"]}))


if __name__ == "__main__":
    main()
