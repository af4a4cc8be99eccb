"""The plain-library baseline for bench/align_throughput.py: TRL 1.16's trainer of each method + PEFT LoRA, written
as a user would without tunekit, with tunekit's recipe defaults for the method's own keys:

- dpo: DPOTrainer (β 0.1); grpo / rloo: GRPOTrainer / RLOOTrainer (β 0, the last number of the answer as reward);
  gspo: GRPOTrainer with importance_sampling_level="sequence", loss_type="grpo" (GSPO's objective);
- kto: KTOTrainer (β 0.1) on the pairs split into desirable / undesirable records (trl.data_utils);
- orpo, simpo, cpo: trl.experimental's ORPOTrainer (λ 0.1) and CPOTrainer (simpo: β 2.0, γ 1.0; cpo: β 0.1, α 1.0);
- distill: DistillationTrainer (on-policy, β 0.5), the model distilled into a copy of itself.

`--dtype bfloat16` loads the weights in bf16 as tunekit's `model.dtype: auto` does for a frozen base on a CPU with
bf16 units (the LoRA weights stay fp32 in PEFT either way).

Prints one JSON line: {"seconds": training-loop wall time, "steps", "completion_length", "tokens" (TRL's
num_tokens: input tokens seen, padding excluded)}.

    python bench/plain_trl_align.py METHOD --model FOLDER --data FILE --out DIR --steps N --batch B [--r 8]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

METHODS = ("dpo", "grpo", "gspo", "kto", "orpo", "simpo", "cpo", "rloo", "distill")


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


def as_pairs(data):
    return data.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]})


def as_prompts(data, column: str):
    return data.map(lambda r: {"prompt": [{"role": "user", "content": r[column]}]})


def trainer_for(method: str, args, model, tok, timer: LoopTimer):
    """The TRL trainer a user would write for METHOD."""
    data = load_dataset("json", data_files=args.data, split="train")
    common = dict(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=5e-5, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                  gradient_checkpointing=False, use_cpu=True, seed=0)
    sampled = dict(max_completion_length=args.completion_length, temperature=1.0)
    peft = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    kw = dict(model=model, processing_class=tok, peft_config=peft, callbacks=[timer])
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**common, beta=0.1, max_length=args.max_length),
                          train_dataset=as_pairs(data), **kw)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import unpair_preference_dataset

        keep = [c for c in data.column_names if c not in ("prompt", "chosen", "rejected")]
        records = unpair_preference_dataset(as_pairs(data).remove_columns(keep)).shuffle(seed=0)
        return KTOTrainer(args=KTOConfig(**common, beta=0.1, max_length=args.max_length), train_dataset=records,
                          **kw)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(args=ORPOConfig(**common, beta=0.1, max_length=args.max_length),
                           train_dataset=as_pairs(data), **kw)
    if method in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        loss = (dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0) if method == "simpo"
                else dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0))
        return CPOTrainer(args=CPOConfig(**common, **loss, max_length=args.max_length),
                          train_dataset=as_pairs(data), **kw)
    if method in ("grpo", "gspo"):
        from trl import GRPOConfig, GRPOTrainer

        gspo = dict(importance_sampling_level="sequence", loss_type="grpo") if method == "gspo" else {}
        return GRPOTrainer(reward_funcs=[last_number_reward], train_dataset=as_prompts(data, "prompt"),
                           args=GRPOConfig(**common, **sampled, num_generations=args.generations, beta=0.0, **gspo),
                           **kw)
    if method == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOTrainer(reward_funcs=[last_number_reward], train_dataset=as_prompts(data, "prompt"),
                           args=RLOOConfig(**common, **sampled, num_generations=args.generations, beta=0.0), **kw)
    from trl import DistillationConfig, DistillationTrainer

    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    return DistillationTrainer(teacher_model=teacher, train_dataset=as_prompts(data, "instruction"),
                               args=DistillationConfig(**common, **sampled, beta=0.5), **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="the weights' dtype (TRL scripts load fp32 by default)")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model, **({"padding_side": "left"} if args.method in
                                                       ("grpo", "rloo", "distill") else {}))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    timer = LoopTimer()
    trainer = trainer_for(args.method, args, model, tok, timer)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step,
                      "completion_length": sum(lengths) / len(lengths) if lengths else None,
                      "tokens": tokens[-1] if tokens else None}))


if __name__ == "__main__":
    main()
