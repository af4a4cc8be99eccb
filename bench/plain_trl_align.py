"""The plain-library baseline for bench/align_throughput.py: TRL 1.16 DPOTrainer / GRPOTrainer + PEFT LoRA,
written as a user would without tunekit. Prints one JSON line: {"seconds": training-loop wall time, "steps"}.

    python bench/plain_trl_align.py dpo|grpo --model FOLDER --data FILE --steps N --batch B [--r 8]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer


class LoopTimer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.t0


def last_number_reward(completions, answer, **kwargs):
    """1.0 when the completion's last number equals the `#### N` answer."""
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        out.append(float(bool(found) and float(found[-1]) == float(a.split("####")[-1])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["dpo", "grpo"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    data = load_dataset("json", data_files=args.data, split="train")
    common = dict(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=5e-5, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                  gradient_checkpointing=False, use_cpu=True, seed=0)
    peft = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    timer = LoopTimer()
    if args.stage == "dpo":
        data = data.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1, max_length=args.max_length),
                             train_dataset=data, processing_class=tok, peft_config=peft, callbacks=[timer])
    else:
        data = data.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
        cfg = GRPOConfig(**common, num_generations=args.generations, max_completion_length=args.completion_length,
                         temperature=1.0, beta=0.0)
        trainer = GRPOTrainer(model=model, reward_funcs=[last_number_reward], args=cfg, train_dataset=data,
                              processing_class=tok, peft_config=peft, callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step,
                      "completion_length": sum(lengths) / len(lengths) if lengths else None}))


if __name__ == "__main__":
    main()
