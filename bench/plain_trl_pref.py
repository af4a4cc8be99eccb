"""The plain-library baseline for bench/pref_methods.py throughput: TRL 1.16 KTOTrainer (stable) and
trl.experimental's ORPOTrainer / CPOTrainer (SimPO = its `loss_type="simpo"`) + PEFT LoRA, written as a user would
without tunekit, with the same defaults as tunekit's recipes (kto β 0.1; orpo λ 0.1; simpo β 2.0, γ 1.0; cpo β 0.1,
α 1.0). Prints one JSON line: {"seconds": training-loop wall time, "steps"}.

    python bench/plain_trl_pref.py kto|orpo|simpo|cpo --model FOLDER --data FILE --steps N --batch B [--r 8]
"""

from __future__ import annotations

import argparse
import json
import time

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


class LoopTimer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["kto", "orpo", "simpo", "cpo"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    data = load_dataset("json", data_files=args.data, split="train")
    data = data.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    common = dict(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=5e-5, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                  gradient_checkpointing=False, use_cpu=True, seed=0, max_length=args.max_length)
    peft = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    timer = LoopTimer()
    kwargs = dict(model=model, train_dataset=data, processing_class=tok, peft_config=peft, callbacks=[timer])
    if args.method == "kto":
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import unpair_preference_dataset

        data = unpair_preference_dataset(data.remove_columns([c for c in data.column_names
                                                              if c not in ("prompt", "chosen", "rejected")]))
        data = data.shuffle(seed=0)
        kwargs["train_dataset"] = data
        trainer = KTOTrainer(args=KTOConfig(**common, beta=0.1), **kwargs)
    elif args.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(args=ORPOConfig(**common, beta=0.1), **kwargs)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        extra = (dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0) if args.method == "simpo"
                 else dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0))
        trainer = CPOTrainer(args=CPOConfig(**common, **extra), **kwargs)
    trainer.train()
    print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main()
