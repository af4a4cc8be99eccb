"""On-policy distillation (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", GKD) on TRL 1.16's stable DistillationTrainer.

Per completion token t, with p_S and p_T the student's and teacher's next-token distributions (temperature τ):

    JSD_β = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m),   m = β p_T + (1 − β) p_S

(β = 0: forward KL(p_T ‖ p_S); β = 1: reverse KL(p_S ‖ p_T)), averaged over the completion tokens of the batch.
The completions are the student's own samples on a share λ (`distill.lambda`) of the batches, drawn per optimizer
step from the seed (so a resumed run draws the same), and the data's answers on the rest (GKD's mixture;
λ = 1 is TRL's purely on-policy trainer, λ = 0 supervised KD). The teacher is anything tunekit loads (an alias,
a model folder, a hub id, a run directory whose adapter is folded in) and must share the student's tokenizer:
checked before the data is read or any model loads.
"""

from __future__ import annotations

import random
from typing import Any

from tunekit.config.schema import ModelConfig, Recipe
from tunekit.data.preference import PromptRecord
from tunekit.errors import TunekitError
from tunekit.stages import common
from tunekit.stages.runner import Context, Stage, StageData, run_stage


def teacher_config(recipe: Recipe) -> ModelConfig:
    """The teacher's model section: `distill.teacher` with the student's loading options; frozen, so it loads
    in the dtype a frozen base gets (`resolve_dtype`)."""
    from tunekit.models.load import with_resolved_dtype

    cfg = recipe.model.model_copy(update={"name": recipe.distill.teacher, "revision": None})
    return with_resolved_dtype(cfg, frozen=True)


def check_same_tokenizer(student: Any, teacher: Any, teacher_name: str) -> None:
    """Student and teacher must map every token to the same id (the loss compares distributions id by id)."""
    s, t = student.get_vocab(), teacher.get_vocab()
    if s == t:
        return
    differ = sorted(tok for tok in s.keys() | t.keys() if s.get(tok) != t.get(tok))
    tok = differ[0]
    raise TunekitError(
        f"distill.teacher: '{teacher_name}' does not share the student's tokenizer ({len(s)} vs {len(t)} tokens; "
        f"{len(differ)} differ, e.g. {tok!r}: student id {s.get(tok)}, teacher id {t.get(tok)}); distillation "
        "compares the two models' next-token distributions id by id, so pick a teacher of the student's family")


def to_distill(rec: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> PromptRecord:
    """A prompt, and the data's answer (column `completion`) when the record has one: prompt-only records,
    conversations (the last assistant turn is the answer), alpaca, prompt/completion, sharegpt."""
    from tunekit.data.formats import to_messages
    from tunekit.data.preference import to_prompt

    messages = rec.get("messages")
    prompt_only = (fmt == "prompt" or (fmt == "auto" and "prompt" in rec and "completion" not in rec)
                   or (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                       and messages[-1].get("role") != "assistant"))
    if prompt_only:
        found = to_prompt(rec, "prompt", where, system_prompt)
        return PromptRecord(found.prompt, {"completion": None}, where)
    msgs = to_messages(rec, fmt, where, system_prompt)
    if msgs[-1]["role"] != "assistant":
        raise TunekitError(f"{where}: the conversation must end with the assistant's answer (or be a prompt)")
    return PromptRecord(msgs[:-1], {"completion": msgs[-1]["content"]}, where)


def _rows(split: Any) -> tuple[list, list, dict[str, Any], str]:
    def rows(records: list[Any]) -> list[dict[str, Any]]:
        return [{"prompt": r.prompt, "completion": r.columns["completion"]} for r in records]

    answered = sum(r.columns["completion"] is not None for r in split.train)
    return rows(split.train), rows(split.eval), {"with_answer": answered}, f"; {answered} with an answer"


def _distillation_trainer(base: type) -> type:
    """TRL's DistillationTrainer with GKD's λ: on a share 1 − λ of the optimizer steps the completions are the
    data's answers instead of the student's samples (everything else, the loss included, is TRL's)."""

    class MixedDistillationTrainer(base):
        def __init__(self, *args: Any, on_policy_share: float = 1.0, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.on_policy_share = on_policy_share
            self._answers: list[Any] = []

        def on_policy_now(self) -> bool:
            """The draw for this optimizer step: from the seed and the step, identical on every rank and resume."""
            if self.on_policy_share >= 1.0 or not self.model.training:
                return True
            draw = random.Random(f"{self.args.seed}:{self.state.global_step}").random()
            return draw < self.on_policy_share

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            self._answers = [x.get("completion") for x in inputs]
            on_policy = self.on_policy_now()
            self._metrics["train" if self.model.training else "eval"]["on_policy"].append(float(on_policy))
            self._use_answers = not on_policy
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            if not getattr(self, "_use_answers", False):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            return [self._answer_ids(p, ids, a) for p, ids, a in zip(self._prompts, prompt_ids, self._answers)]

        def _answer_ids(self, prompt: list[dict[str, str]], prompt_ids: list[int], answer: str | None) -> list[int]:
            """The answer's tokens as the chat template renders them after the prompt, up to its end-of-turn."""
            if answer is None:
                raise TunekitError("distill: a batch drawn off-policy holds a prompt without an answer")
            full = self.processing_class.apply_chat_template(
                conversation=[*prompt, {"role": "assistant", "content": answer}], chat_template=self.chat_template,
                tokenize=True, return_dict=True, **self.chat_template_kwargs)["input_ids"]
            if list(full[: len(prompt_ids)]) == list(prompt_ids):
                ids = list(full[len(prompt_ids):])
            else:  # a template that rewrites earlier turns: the answer's own tokens and an end-of-sequence
                ids = self._tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]
            ends = [i for i, t in enumerate(ids) if t in self.eos_token_ids]
            ids = ids[: ends[0] + 1] if ends else ids
            return ids[: self.max_completion_length]

        def _tokenize_prompts(self, prompts: list):
            self._prompts = list(prompts)
            return super()._tokenize_prompts(prompts)

    return MixedDistillationTrainer


class DistillStage(Stage):
    name = "distill"

    def load_tokenizer(self, recipe: Recipe) -> Any:
        """The student's tokenizer, after checking the teacher's is the same (before any data or weights)."""
        from tunekit.models.load import load_tokenizer

        tok = load_tokenizer(recipe.model)
        check_same_tokenizer(tok, load_tokenizer(teacher_config(recipe)), str(recipe.distill.teacher))
        return tok

    def load_data(self, recipe: Recipe, tok: Any) -> StageData:
        data = common.record_data(recipe, to_distill, "prompt", "prompts", _rows,
                                  lambda r: r.columns.get("completion"))
        missing = data.counts["train_prompts"] - data.counts["with_answer"]
        if recipe.distill.lambda_ < 1 and missing:
            raise TunekitError(
                f"distill.lambda: {recipe.distill.lambda_:g} < 1 draws the data's answers on some steps, but "
                f"{missing} training record(s) are prompts without an answer; use conversations (or "
                "prompt/completion records), or distill.lambda: 1 (fully on-policy)")
        return data

    def load_model(self, recipe: Recipe, tok: Any) -> tuple[Any, Any]:
        """The student with its adapter, and the frozen teacher (same vocabulary rows, checked)."""
        from tunekit.console import console
        from tunekit.models.load import load_model

        tok, student = common.load_trainable(recipe, tok)
        teacher = load_model(teacher_config(recipe), tok)
        teacher.requires_grad_(False)
        teacher.eval()
        rows = (student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
        if rows[0] != rows[1]:
            raise TunekitError(f"distill.teacher: '{recipe.distill.teacher}' has {rows[1]} output rows and the "
                               f"student {rows[0]}; they need the same vocabulary")
        console.print(f"teacher: {recipe.distill.teacher} ({sum(p.numel() for p in teacher.parameters()):,} "
                      "parameters, frozen)")
        self.teacher = teacher
        return tok, student

    def build_trainer(self, ctx: Context) -> Any:
        from trl import DistillationConfig, DistillationTrainer

        from tunekit.generation import _vllm_usable

        r, d = ctx.recipe, ctx.recipe.distill
        args = common.training_arguments(
            r, ctx.run, DistillationConfig,
            beta=d.beta,
            temperature=d.temperature,
            top_p=d.top_p,
            max_completion_length=d.max_completion_length,
            use_vllm=_vllm_usable() if d.use_vllm is None else d.use_vllm,
            log_completions=False,
            disable_dropout=True,
        )
        ctx.callbacks = common.standard_callbacks(ctx.run, None)
        return _distillation_trainer(DistillationTrainer)(
            model=ctx.model,
            teacher_model=self.teacher,
            args=args,
            train_dataset=ctx.data.train,
            eval_dataset=ctx.data.eval,
            processing_class=ctx.tokenizer,
            callbacks=ctx.callbacks,
            on_policy_share=d.lambda_,
        )

    def finish_card(self, ctx: Context, trainer: Any) -> dict[str, Any]:
        d = ctx.recipe.distill
        return {"distill": {"teacher": d.teacher, "lambda": d.lambda_, "beta": d.beta}}


def run_distill(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> common.StageResult:
    """Distil `distill.teacher` into the recipe's model (student); returns the finished run."""
    return run_stage(DistillStage(), recipe, overwrite=overwrite, resume=resume)
