"""The recipe schema: the single source of truth for YAML keys, `--set` overrides and `--print-config`.

Every section forbids unknown keys, so a typo is an error (with a "did you mean" suggestion), never ignored.
Later stages (rm, dpo, grpo, ppo, cai) add their own section next to `train`; the shared sections stay.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tunekit.config.sections import Section
from tunekit.config.stages import (
    STAGE_SECTIONS,
    CaiConfig,
    CPOConfig,
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ORPOConfig,
    PPOConfig,
    RLOOConfig,
    RMConfig,
    SimPOConfig,
)
from tunekit.rewards.registry import RewardSpec

DataFormat = Literal[
    "auto", "alpaca", "messages", "sharegpt", "prompt_completion", "preference", "preference_transcript", "prompt",
    "unpaired",
]
Stage = Literal["sft", "rm", "dpo", "grpo", "ppo", "cai", "kto", "orpo", "simpo", "rloo", "distill"]


def one_of(key: str, value: str, valid: Iterable[str]) -> str:
    """`value` if it is in `valid`, else a ValueError with a did-you-mean and the valid names."""
    valid = list(valid)
    if value in valid:
        return value
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"{key}: unknown name '{value}'{hint}; valid: {', '.join(valid)}")


def scheduler_names() -> list[str]:
    """transformers' own scheduler names (`SchedulerType`)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def optimizer_names() -> list[str]:
    """transformers' own optimizer names (`OptimizerNames`)."""
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


# The package each transformers reporting integration needs (importable module name).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "trackio": ("trackio",), "comet_ml": ("comet_ml",), "clearml": ("clearml",),
                    "dvclive": ("dvclive",), "neptune": ("neptune",), "codecarbon": ("codecarbon",),
                    "swanlab": ("swanlab",), "azure_ml": ("azureml",), "dagshub": ("dagshub",),
                    "flyte": ("flytekit",), "kubeflow": ("kubeflow",)}


def tracker_names() -> list[str]:
    """transformers' own reporting integrations (`INTEGRATION_TO_CALLBACK`)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def no_effect(section: BaseModel, keys: Iterable[str], why: str, prefix: str) -> None:
    """Refuse keys the user set to a non-default value that does nothing in the chosen mode (`why` says which).
    Defaults pass, so a resolved recipe (every key written out, e.g. a run's recipe.yaml) loads again."""
    fields = type(section).model_fields
    given = [k for k in keys if k in section.model_fields_set and getattr(section, k) != fields[k].get_default(
        call_default_factory=True)]
    if given:
        raise ValueError(f"{', '.join(prefix + k for k in given)}: no effect {why}; remove it")


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="Hub id, local folder, or the alias `smollm2-135m`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; `auto` = bf16 on GPUs that support it; on a CPU with native bf16 (AMX, "
        "AVX512-BF16) bf16 for a frozen base under an adapter when the checkpoint is stored in bf16; else fp32."
    )
    load_in_4bit: bool = Field(False, description="Load the base in 4-bit (bitsandbytes); with an adapter = QLoRA.")
    load_in_8bit: bool = Field(False, description="Load the base in 8-bit (bitsandbytes LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_double_quant: bool = Field(True, description="Quantize the 4-bit scales too (QLoRA's double quant).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless asked.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="`auto` = sdpa (flash_attention_2 when installed on a GPU)."
    )
    chat_template: str | None = Field(
        None,
        description="Override the chat template: a name (`chatml`), a .jinja file or a template string. "
        "Default: the tokenizer's own, else `chatml`.",
    )

    @model_validator(mode="after")
    def _one_quantization(self) -> ModelConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are mutually exclusive")
        if not self.load_in_4bit:
            no_effect(self, ("bnb_4bit_quant_type", "bnb_4bit_double_quant"), "without model.load_in_4bit", "model.")
        return self

    @field_validator("chat_template")
    @classmethod
    def _template_compiles(cls, v: str | None) -> str | None:
        """A template string (or .jinja file) must compile with transformers' own Jinja environment."""
        if v is None or not ("{%" in v or "{{" in v or v.endswith(".jinja")):
            return v
        from pathlib import Path

        text, where = v, "model.chat_template"
        if v.endswith(".jinja"):
            path = Path(v).expanduser()
            if not path.is_file():
                return v  # reported with its name when the template is applied
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"model.chat_template: {where}: not UTF-8 text") from None
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(text)
        except jinja2.TemplateSyntaxError as exc:
            shown = f"line {exc.lineno}" if where == "model.chat_template" else f"{where}:{exc.lineno}"
            raise ValueError(f"model.chat_template: {shown}: invalid Jinja template: {exc.message}") from None
        return v


class DataSource(Section):
    path: str = Field(description="Local file/folder (jsonl, json, csv, parquet) or a hub dataset id.")
    format: DataFormat | None = Field(None, description="Record format; default: `data.format`.")
    weight: float = Field(1.0, gt=0, description="Sampling multiplier: 2.0 = every record twice, 0.5 = half.")
    split: str = Field("train", description="Split of a hub dataset.")
    name: str | None = Field(None, description="Config name of a hub dataset.")


class DataConfig(Section):
    train: str | list[DataSource] | None = Field(None, description="Training data: a path/hub id or a list of sources.")
    eval: str | list[DataSource] | None = Field(None, description="Held-out data; default: carved off `train`.")
    eval_split: float = Field(
        0.05, ge=0, description="Eval records carved off train when `eval` is unset: a fraction (<1) or a count."
    )
    max_eval_samples: int | None = Field(256, ge=1, description="Cap on eval records (None = all).")
    format: DataFormat = Field("auto", description="Record format of every source that names none.")
    max_length: int = Field(1024, ge=8, description="Maximum tokens per example.")
    truncation: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer examples.")
    packing: bool = Field(False, description="Pack examples into max_length rows, padding-free, no cross attention.")
    train_on: Literal["assistant", "all"] = Field("assistant", description="Loss on assistant tokens or all tokens.")
    system_prompt: str | None = Field(None, description="System message prepended to conversations that lack one.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training records (after mixing).")
    seed: int | None = Field(None, description="Shuffle/split seed; default: train.seed.")


class SVFTConfig(Section):
    """SVFT (Lingam et al., 2024): W' = U (Σ + M) V^T, only the sparse M trains."""

    pattern: Literal["plain", "banded", "random", "top_k"] = Field(
        "plain",
        description="Sparsity of M: `plain` = diagonal (n per module), `banded` = 2d+1 diagonals, "
        "`random` = k random entries per row, `top_k` = dense k x k among the top k singular vectors.",
    )
    d: int = Field(1, ge=0, description="`banded`: off-diagonals on EACH side of the diagonal (2d+1 in all).")
    k: int = Field(4, ge=1, description="`random`: entries per row of M; `top_k`: singular vectors (k² entries).")
    rank: int | None = Field(
        None,
        ge=1,
        description="Keep only the top `rank` singular vectors (n = min(rank, d_out, d_in)) to save memory; "
        "the rest of W stays frozen. Default: all (n = min(d_out, d_in)).",
    )
    seed: int = Field(0, description="`random`: seed of the pattern (saved with the adapter).")


_SCORE_HEAD_NOT_SAVED = ("its saved format holds only the wrapped linear layers, not the `score` head a reward "
                         "model must train and save; use lora, dora or none")
_PEFT_CONVERSION_FAILS = ("PEFT 0.21's conversion to a plain LoRA at save time (path_initial_model_for_weight_"
                          "conversion) fails on the `score` head a reward model must save (KeyError 'score.weight'); "
                          "use lora, dora or none")
#: adapter.method -> why it cannot train a reward model (`tunekit rm`: a sequence-classification model whose
#: `score` head trains in full); the methods not listed can. The recipe is refused when it is read; each adapter
#: kind's registration carries the same fact (`AdapterKind.seq_cls_refusal`, checked by
#: tests/test_adapters_registry.py).
REWARD_MODEL_REFUSALS: dict[str, str] = {
    "pissa": _PEFT_CONVERSION_FAILS,
    "milora": _PEFT_CONVERSION_FAILS,
    "lora_xs": _SCORE_HEAD_NOT_SAVED,
    "svft": _SCORE_HEAD_NOT_SAVED,
}


class AdapterConfig(Section):
    method: Literal["none", "lora", "dora", "pissa", "milora", "lora_xs", "svft"] = Field(
        "lora",
        description="`none` = full fine-tuning; lora, dora, pissa, milora (LoRA-family, rank `r`), lora_xs "
        "(r x r per module), svft (see `adapter.svft`). With model.load_in_4bit any of them is QLoRA-style.",
    )
    r: int = Field(16, ge=1, description="Rank.")
    alpha: float | None = Field(None, description="Scale numerator; default 2·r. Update scale = alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: str | list[str] = Field("all-linear", description="`all-linear` or module names (q_proj, ...).")
    rslora: bool = Field(False, description="Rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023).")
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full (e.g. lm_head).")
    svd_niter: int | None = Field(
        None,
        ge=0,
        description="pissa, lora_xs: fast randomized SVD with this many subspace iterations (PiSSA's "
        "`pissa_niter_N`); default: exact SVD. Not for milora/svft (they need the full spectrum).",
    )
    lora_xs_init_std: float = Field(
        1e-5, ge=0, description="lora_xs: std of R's Gaussian init (the paper's 1e-5); 0 = zeros (exact init)."
    )
    svft: SVFTConfig = Field(default_factory=SVFTConfig, description="SVFT options (method: svft).")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    @model_validator(mode="after")
    def _svd_niter_only_where_it_helps(self) -> AdapterConfig:
        if self.svd_niter is not None and self.method in ("milora", "svft"):
            raise ValueError(
                f"adapter.svd_niter: the fast SVD finds only the principal components; {self.method} needs "
                "the full spectrum (leave svd_niter unset)"
            )
        return self

    @model_validator(mode="after")
    def _options_of_the_method(self) -> AdapterConfig:
        """Options only one method reads are refused elsewhere. The shared LoRA-family keys (r, alpha, dropout,
        targets, rslora) are accepted with every method, so one recipe can switch `adapter.method` by --set."""
        m, why = self.method, f"with adapter.method {self.method}"
        if m not in ("pissa", "lora_xs"):
            no_effect(self, ("svd_niter",), why, "adapter.")
        if m != "lora_xs":
            no_effect(self, ("lora_xs_init_std",), why, "adapter.")
        if self.targets == [] or self.targets == "":
            raise ValueError("adapter.targets: empty; use `all-linear` or module names")
        return self


class TrainConfig(Section):
    max_steps: int = Field(-1, description="Optimizer steps; -1 = use epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps = -1).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    batch_size: int = Field(4, ge=1, description="Examples (or packed rows) per device per micro-step.")
    eval_batch_size: int | None = Field(None, ge=1, description="Default: batch_size.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    seed: int = Field(42, description="Seed for init, data order and dropout.")
    save_steps: int = Field(100, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end only).")
    logging_steps: int = Field(1, ge=1, description="Log loss/lr/tokens-per-s every N steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations: 0.4-0.7x the peak memory, ~1.33x the FLOPs "
        "(1.2-1.9x the step time on a 2-core CPU, docs/benchmarks.md)."
    )
    optim: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, paged_adamw_8bit, ...).")
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb, mlflow, trackio.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    loss_impl: Literal["chunked", "plain"] = Field(
        "chunked", description="`chunked` = only labelled positions go through the LM head, in chunks (no "
        "tokens x vocab fp32 logits); `plain` = transformers' own loss, for comparison."
    )
    kernels: Literal["none", "liger"] = Field(
        "none", description="`liger` = Liger's fused Triton kernels (CUDA GPU, `pip install liger-kernel`)."
    )

    @field_validator("kernels")
    @classmethod
    def _liger_installed(cls, v: str) -> str:
        import importlib.util

        if v == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("train.kernels: liger needs `pip install liger-kernel` (and a CUDA GPU)")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        if isinstance(v, str):
            return [] if v in ("", "none") else [v]
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        return one_of("train.lr_scheduler", v, scheduler_names())

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return one_of("train.optim", v, optimizer_names())

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        import importlib.util

        names = tracker_names()
        for name in v:
            one_of("train.report_to", name, names)
            packages = TRACKER_PACKAGES.get(name, ())
            if packages and not any(importlib.util.find_spec(p) for p in packages):
                raise ValueError(
                    f"train.report_to: '{name}' needs the {packages[0]} package (pip install {packages[0]})"
                )
        return v

    @model_validator(mode="after")
    def _no_dead_options(self) -> TrainConfig:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"train.max_steps: must be a positive number of steps, or -1 to use epochs "
                             f"(got {self.max_steps})")
        return self


class GenerateConfig(Section):
    samples: int = Field(4, ge=0, description="Sample generations written to the run directory.")
    max_new_tokens: int = Field(64, ge=1, description="Length budget of each sample generation.")
    prompts: list[str] | None = Field(None, description="Prompts for samples; default: eval prompts.")


class LaunchConfig(Section):
    gpus: int = Field(1, ge=1, description="GPUs per node; more than one relaunches under `accelerate launch`.")
    nodes: int = Field(1, ge=1, description="Machines (multi-node needs --main-address and --machine-rank).")
    strategy: Literal["auto", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2"] = Field(
        "auto", description="Data-parallel strategy; `auto` = the memory planner's choice (see `tunekit plan`)."
    )


class Recipe(Section):
    stage: Stage = Field("sft", description="Which stage this recipe is for (set by the command).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    rm: RMConfig = Field(default_factory=RMConfig, description="`tunekit rm` only.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="`tunekit dpo` (and cai's preference phase).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="`tunekit grpo` only.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="`tunekit ppo` only.")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="`tunekit rloo` only.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="`tunekit distill` only.")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="grpo/ppo/rloo: weighted rewards, e.g. [{name: math_answer, weight: 1.0}]; other keys of an entry "
        "are the reward's parameters (docs/rewards.md).",
    )
    cai: CaiConfig = Field(default_factory=CaiConfig, description="Constitutional AI (`tunekit cai`).")
    kto: KTOConfig = Field(default_factory=KTOConfig, description="`tunekit kto` only.")
    orpo: ORPOConfig = Field(default_factory=ORPOConfig, description="`tunekit orpo` only.")
    simpo: SimPOConfig = Field(default_factory=SimPOConfig, description="`tunekit simpo` only.")
    cpo: CPOConfig = Field(default_factory=CPOConfig, description="`tunekit simpo` with simpo.variant: cpo.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: str | None = Field(None, description="Run directory; default runs/<stage>-<timestamp>.")

    @model_validator(mode="after")
    def _sections_of_this_stage(self) -> Recipe:
        for name in sorted(self.foreign_sections() & self.model_fields_set):
            raise ValueError(foreign_section_message(name, self.stage))
        if self.stage not in ("sft", "cai"):  # sft-only data options: set here they would do nothing
            for key in sorted({"packing", "train_on"} & self.data.model_fields_set):
                if getattr(self.data, key) != DataConfig.model_fields[key].default:
                    raise ValueError(f"data.{key}: no effect with stage {self.stage} (sft only); remove it")
        if self.stage == "rm" and self.adapter.method in REWARD_MODEL_REFUSALS:
            raise ValueError(f"adapter.method={self.adapter.method} cannot train a reward model: "
                             f"{REWARD_MODEL_REFUSALS[self.adapter.method]}")
        if self.stage == "grpo" and not self.rewards:
            raise ValueError("tunekit grpo needs `rewards:`, e.g. rewards: [{name: math_answer, weight: 1.0}]")
        if self.stage == "ppo" and not self.rewards:
            raise ValueError("tunekit ppo needs `rewards:`, e.g. rewards: [{name: reward_model, path: runs/rm}]")
        if self.stage == "ppo" and self.train.max_steps < 1:
            raise ValueError("tunekit ppo needs train.max_steps >= 1 (PPO steps, one rollout batch each)")
        if self.stage == "simpo":
            if self.simpo.variant == "cpo":
                no_effect(self.simpo, ("beta", "gamma", "gamma_beta_ratio"), "with simpo.variant cpo (see cpo.*)",
                          "simpo.")
            else:
                no_effect(self.cpo, ("beta", "alpha"), "with simpo.variant simpo", "cpo.")
        if self.stage == "kto" and self.train.batch_size < 2 and self.kto.loss_type == "kto":
            raise ValueError("train.batch_size: KTO estimates its KL term from the other records of a batch; "
                             "use batch_size >= 2")
        if self.stage == "rloo" and not self.rewards:
            raise ValueError("tunekit rloo needs `rewards:`, e.g. rewards: [{name: math_answer, weight: 1.0}]")
        if self.stage in ("grpo", "rloo"):
            k = getattr(self, self.stage).num_generations
            rows = self.train.batch_size * self.train.grad_accum
            if rows % k:
                raise ValueError(
                    f"{self.stage}.num_generations ({k}) must divide train.batch_size x "
                    f"train.grad_accum ({rows}): each prompt's group of completions is one batch slice"
                )
        if self.stage == "distill" and not self.distill.teacher:
            raise ValueError("distill.teacher: tunekit distill needs a teacher, e.g. distill: {teacher: runs/demo} "
                             "(a model, hub id or run directory sharing the student's tokenizer)")
        return self

    def foreign_sections(self) -> set[str]:
        """Sections of other stages: this stage never reads them (and the dumped recipe leaves them out)."""
        return foreign_sections(self.stage)


def foreign_sections(stage: str) -> set[str]:
    own = set(STAGE_SECTIONS[stage])
    return {n for secs in STAGE_SECTIONS.values() for n in secs} - own


def foreign_section_message(name: str, stage: str) -> str:
    owners = [s for s, secs in STAGE_SECTIONS.items() if name in secs]
    return (f"section '{name}' belongs to stage {' / '.join(owners)}, not to '{stage}' "
            f"(run `tunekit {owners[0]}`, or remove it)")
