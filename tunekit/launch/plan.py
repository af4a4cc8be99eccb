"""The memory planner: per-GPU bytes of a training run, from config.json alone (meta device, no weights read).

peak = weights + optimizer states + max(activations + logits, gradients (+ DDP bucket copy) + optimizer-step
temporaries): activations shrink while gradients grow during the backward pass, so the two never peak together.

Sources of the byte counts (each function below says which applies):
- mixed-precision AdamW under ZeRO/FSDP: 2 (bf16 weight) + 2 (grad) + 12 (fp32 master, m, v) bytes per trainable
  parameter, partitioned over P ranks by stage 1/2/3 (Rajbhandari et al., 2020, "ZeRO", §5).
- NF4 (Dettmers et al., 2023, "QLoRA", §3): 4 bits per weight + one absmax per 64-weight block, fp32 (32/64 =
  0.5 bit) or, with double quantization, 8-bit absmax plus an fp32 scale per 256 blocks (8/64 + 32/(64·256) =
  0.127 bit). LLM.int8 (Dettmers et al., 2022): 1 byte per weight + one fp32 scale per output row.
- activations: the tensors autograd saves in a Llama-style decoder layer with fused (flash/SDPA) attention, counted
  by hand and checked against `torch.autograd.graph.saved_tensors_hooks` (tests/test_plan.py); gradient
  checkpointing keeps one hidden state per layer and recomputes one layer at a time (Chen et al., 2016).
Hand-written: no library computes these from a recipe (accelerate's `estimate-memory` counts weights only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from tunekit.errors import TunekitError

GiB = 1024**3
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2")
STAGES = ("sft", "rm", "dpo", "grpo", "ppo", "cai", "kto", "orpo", "simpo", "rloo", "distill")
PAIRED_STAGES = ("dpo", "orpo", "simpo")  # chosen and rejected run in one batch of 2 x micro_batch rows
# usable share of a GPU: the CUDA context, NCCL buffers and allocator fragmentation take the rest
USABLE_SHARE = 0.9
DEEPSPEED_BUCKET = 50_000_000  # elements; the reduce/allgather bucket our generated DeepSpeed JSON sets


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from config.json and the model built on the meta device."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    total_params: int  # base model, shared (tied) tensors once
    quantizable_params: int  # weights of the nn.Linear layers bitsandbytes quantizes (all but the output head)
    quantizable_rows: int  # their output rows (LLM.int8 keeps one fp32 scale per row)
    layer_params: int  # one decoder layer
    embed_params: int  # input embedding (and the output head when untied: the larger of the two)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Setup:
    """One training configuration to estimate."""

    method: str = "lora"  # adapter.method; "none" = full fine-tuning
    trainable_params: int = 0
    quant: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    dtype_bytes: int = 2  # weights and activations: 2 (bf16/fp16) or 4 (fp32)
    strategy: str = "ddp"
    gpus: int = 1
    nodes: int = 1
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    optim: str = "adamw_torch"
    stage: str = "sft"
    lora_dropout: bool = True  # adapter dropout > 0 (each adapted module keeps its own dropped copy of its input)
    adapter_rank: int = 16
    adapted_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout_mask_bytes: int = 1  # CUDA's fused dropout keeps a bool mask (the CPU kernel keeps one in the input dtype)

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def full(self) -> bool:
        return self.method == "none"

    def describe(self) -> str:
        method = "full" if self.full else self.method
        if self.quant in ("nf4", "fp4"):
            method = f"q{method}" if method in ("lora", "dora") else f"{method}+{self.quant}"
        elif self.quant == "int8":
            method = f"{method}+int8"
        where = f"{self.world} GPU" + ("s" if self.world > 1 else "")
        if self.nodes > 1:
            where += f" on {self.nodes} nodes"
        strategy = "single" if self.world == 1 and self.strategy == "ddp" else self.strategy
        ckpt = ", checkpointing" if self.checkpointing else ""
        return (f"{method}, {strategy}, {where}, micro-batch {self.micro_batch} x accum {self.grad_accum} "
                f"x {self.seq_len} tokens{ckpt}, {self.optim}")


@dataclass
class Row:
    name: str
    bytes: float
    detail: str = ""


@dataclass
class Plan:
    """Per-GPU estimate of one setup; `recommendation` is the fastest setup that fits (None if none does)."""

    setup: Setup
    shape: ModelShape
    rows: list[Row]
    peak: float
    host_bytes: float
    gpu_mem: float
    notes: list[str] = field(default_factory=list)
    refused: str | None = None  # why this setup cannot run at all (e.g. ZeRO-3 with a 4-bit base)
    recommendation: Plan | None = None

    @property
    def fits(self) -> bool:
        return self.refused is None and self.peak <= USABLE_SHARE * self.gpu_mem

    def row(self, name: str) -> float:
        return sum(r.bytes for r in self.rows if r.name == name)

    def summary(self) -> str:
        """One line for the start of every training command."""
        verdict = "fits" if self.fits else ("refused: " + self.refused if self.refused else "does NOT fit")
        line = (f"plan: {self.setup.describe()}: estimated peak {gib(self.peak)} per GPU of {gib(self.gpu_mem)} "
                f"({verdict})")
        if not self.fits and self.recommendation is not None:
            line += f"; fits: {self.recommendation.setup.describe()} ({gib(self.recommendation.peak)})"
        return line


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_size(text: str | float | int) -> float:
    """`24GiB`, `80GB`, `24` (GiB), `512MiB` -> bytes."""
    if isinstance(text, (int, float)):
        return float(text) * GiB
    units = {"kib": 1024, "mib": 1024**2, "gib": GiB, "tib": 1024**4,
             "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1024, "m": 1024**2, "g": GiB, "": GiB}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:  # (`not >` also refuses nan)
        raise TunekitError(f"--gpu-mem '{text}': expected a size such as 24GiB, 80GB or 40")
    size = value * units[unit]
    if not math.isfinite(size) or size > 1024**5:  # above a PiB per GPU is a typo, not a GPU
        raise TunekitError(f"--gpu-mem '{text}': not a finite size a GPU can have (at most 1 PiB)")
    return size


# ---------------------------------------------------------------------------------------------- model shape


def shape_of(model: Any, name: str = "") -> ModelShape:
    """Read the shape from a model built on the meta device (`tunekit.models.load.build_meta_model`)."""
    import torch

    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    out = model.get_output_embeddings()
    out_weight = out.weight if out is not None else None
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    q_params = q_rows = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not out_weight:
            q_params += module.weight.numel()
            q_rows += module.weight.shape[0]
    layers = _decoder_layers(model)
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    embed = model.get_input_embeddings().weight.numel()
    if out_weight is not None:
        embed = max(embed, out_weight.numel())
    return ModelShape(
        name=name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        hidden=hidden, layers=text.num_hidden_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, vocab=text.vocab_size,
        total_params=total, quantizable_params=q_params, quantizable_rows=q_rows,
        layer_params=layer_params, embed_params=embed,
    )


def _decoder_layers(model: Any) -> list:
    import torch

    best: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            best = list(module)
    return best


def count_adapter(recipe: Any, method: str | None = None) -> int:
    """Trainable parameters of the recipe's adapter (or `method`), counted as `tunekit sft --dry-run` does:
    attach on the meta device and count what requires grad."""
    from tunekit.adapters import AttachContext, attach, count_trainable
    from tunekit.models.load import build_meta_model

    adapter = recipe.adapter if method is None else recipe.adapter.model_copy(update={"method": method})
    model = build_meta_model(recipe.model)
    quantized = (recipe.model.load_in_4bit or recipe.model.load_in_8bit) and adapter.method != "none"
    model = attach(model, adapter, AttachContext(quantized=quantized, meta=True))
    trainable, _ = count_trainable(model)
    return trainable


# ---------------------------------------------------------------------------------------------- the estimate


def weight_bytes(shape: ModelShape, quant: str, dtype_bytes: int, double_quant: bool = True) -> float:
    """Base weights. nf4/fp4: Q·(1/2 + 1/64·(1 + 4/256)) with double quant, Q·(1/2 + 4/64) without (QLoRA §3);
    int8: Q + 4·rows (LLM.int8); the rest (embeddings, norms, output head) stays in `dtype_bytes`."""
    q, rest = shape.quantizable_params, shape.total_params - shape.quantizable_params
    if quant in ("nf4", "fp4"):
        scales = (1 + 4 / 256) / 64 if double_quant else 4 / 64
        return q * (0.5 + scales) + rest * dtype_bytes
    if quant == "int8":
        return q * 1 + 4 * shape.quantizable_rows + rest * dtype_bytes
    return shape.total_params * dtype_bytes


def optimizer_bytes_per_param(optim: str, state_bytes: int) -> float:
    """AdamW keeps m and v in the parameter's dtype (2·state_bytes); bitsandbytes 8-bit AdamW keeps them in
    int8 with an fp32 absmax per 256-value block (2·(1 + 4/256)); SGD/Adafactor-style ≈ 0 here."""
    o = optim.lower()
    if "8bit" in o:
        return 2 * (1 + 4 / 256)
    if o.startswith("sgd") or "adafactor" in o:
        return 0.0
    return 2.0 * state_bytes


ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """Bytes autograd saves per token in one decoder layer (fused attention, no s² matrix), e = dtype bytes:
    common: 8h (each RMSNorm keeps an fp32 copy of its input) + e·(q + 2·kv + q) + 4·heads (q, k, v, attention
    output, logsumexp); full: + e·(4h + 4i) (norm outputs, o_proj input, MLP gate/up/act/down inputs);
    adapters: + 3e·i (MLP) and, per adapted module, its input cast to fp32 (PEFT keeps adapter weights in fp32)
    plus the dropout mask, and its rank-r fp32 intermediate."""
    e, h, kv, i, q = s.dtype_bytes, shape.hidden, shape.kv_dim, shape.intermediate, shape.q_dim
    common = 8 * h + e * (2 * q + 2 * kv) + 4 * shape.heads
    if s.full:
        return common + e * (4 * h + 4 * i)
    width = dict(zip(ADAPTABLE, (h, h, h, q, h, h, i)))
    adapted = [width[m] for m in s.adapted_modules if m in width]
    if s.lora_dropout:
        inputs = sum(adapted) * (4 + s.dropout_mask_bytes)  # each module: its own dropped fp32 copy + mask
    elif e < 4:
        inputs = sum(adapted) * 4  # each module casts its input to fp32
    else:  # fp32 without dropout: the adapters read the tensors the layer already keeps
        inputs = 4 * sum({"q_proj": h, "gate_proj": h, "down_proj": i}.get(m, 0) for m in s.adapted_modules)
        inputs += 4 * (h if {"q_proj", "k_proj", "v_proj"} & set(s.adapted_modules)
                       and "q_proj" not in s.adapted_modules else 0)
    return common + e * 3 * i + inputs + 4 * s.adapter_rank * len(adapted)


def activation_bytes(shape: ModelShape, s: Setup) -> tuple[float, float]:
    """(decoder activations, logits + loss buffers) of one micro-batch on one GPU."""
    rows = s.micro_batch * (2 if s.stage in PAIRED_STAGES else 1)
    tokens = rows * s.seq_len
    per_layer = layer_activation_bytes(shape, s)
    head = (4 + 2 * s.dtype_bytes) * shape.hidden  # final norm + output-head input
    if s.checkpointing:
        decoder = tokens * (shape.layers * s.dtype_bytes * shape.hidden + per_layer + head)
    else:
        decoder = tokens * (shape.layers * per_layer + head)
    if s.stage == "rm":
        logits = 0.0  # one score per sequence
    else:
        # log_softmax keeps fp32 log-probs (4V); its backward holds the incoming and outgoing fp32 grads (8V)
        logits = tokens * shape.vocab * 12.0
    if s.stage == "ppo":
        decoder *= 2  # the value model runs its own forward and backward on the same tokens
    return decoder, logits


def estimate_setup(shape: ModelShape, s: Setup, gpu_mem: float) -> Plan:
    """Per-GPU rows and peak of one setup (see the module docstring for the rule)."""
    P = s.world
    e = s.dtype_bytes
    T = s.trainable_params
    rows: list[Row] = []
    notes: list[str] = []
    refused = None
    quantized = s.quant != "none"
    if quantized and s.full:
        refused = "full fine-tuning cannot train a 4/8-bit base; use an adapter (QLoRA)"
    if quantized and s.strategy in ("zero3", "zero3_offload"):
        refused = ("DeepSpeed ZeRO-3 cannot partition a bitsandbytes-quantized base; use fsdp2 "
                   "(QLoRA + FSDP2) or zero2 with the 4-bit base")
    if s.quant == "int8" and s.strategy == "fsdp2":
        refused = "FSDP2 cannot shard an 8-bit (LLM.int8) base; use 4-bit (nf4) with fsdp2, or zero2"
    if s.stage not in STAGES:
        raise TunekitError(f"plan: unknown stage '{s.stage}' (known: {', '.join(STAGES)})")

    sharded = s.strategy in ("zero3", "zero3_offload", "fsdp2")
    offload = s.strategy == "zero3_offload"
    mixed = s.strategy.startswith("zero") or s.strategy == "fsdp2"  # fp32 master weights (ZeRO/FSDP2)

    # --- weights (frozen base; for full fine-tuning the whole model)
    base = weight_bytes(shape, s.quant, e, s.double_quant)
    frozen = base if not s.full else 0.0
    trainable_w = (T * e if s.full else T * 4.0)  # PEFT keeps adapter weights in fp32
    if mixed:
        trainable_w = T * 2.0 if s.strategy != "fsdp2" else T * 4.0  # DeepSpeed bf16 copy; FSDP2 upcasts to fp32
    host = 0.0
    if sharded:
        gathered = max(2 * shape.layer_params, shape.embed_params) * e  # the layers being computed (+ prefetch)
        if offload:
            host += (frozen + trainable_w) / P
            rows.append(Row("weights", gathered, f"params offloaded to CPU; {gib(gathered)} gathered at a time"))
        else:
            rows.append(Row("weights", (frozen + trainable_w) / P + gathered,
                            f"1/{P} shard + {gib(gathered)} gathered layers"))
    else:
        what = {"nf4": "NF4" + (" + double-quant scales" if s.double_quant else " + fp32 scales"),
                "fp4": "FP4 + scales", "int8": "int8 + row scales"}.get(s.quant, f"{8 * e}-bit")
        rows.append(Row("weights", frozen + (trainable_w if s.full else 0.0), what))
    if not s.full:
        adapter = trainable_w / P if sharded else trainable_w
        if offload:
            adapter = 0.0  # counted with the offloaded params above
        rows.append(Row("adapter", adapter, f"{T:,} trainable parameters"))

    # --- gradients
    if mixed:
        grad_bytes = T * (4.0 if s.strategy == "fsdp2" else 2.0)  # FSDP2 grads follow the fp32-upcast params
    else:
        grad_bytes = T * (e if s.full else 4.0)
    if s.strategy in ("zero2", "zero3", "fsdp2"):
        grads = grad_bytes / P + (DEEPSPEED_BUCKET * 2 if s.strategy != "fsdp2" else 0)
        detail = f"1/{P} partition"
    elif offload:
        grads = DEEPSPEED_BUCKET * 2.0
        detail = "partitions offloaded to CPU; one bucket on GPU"
        host += T * 4.0 / P
    else:
        grads = grad_bytes
        detail = "full copy"
        if s.strategy == "zero1":
            grads += DEEPSPEED_BUCKET * 2
    rows.append(Row("gradients", grads, detail))
    if s.strategy == "ddp" and P > 1:
        rows.append(Row("ddp buckets", grad_bytes, "DDP copies gradients into its all-reduce buckets"))

    # --- optimizer states
    if mixed:
        per = 4.0 + optimizer_bytes_per_param(s.optim, 4)  # fp32 master + states
        opt = T * per
        detail = "fp32 master + " + ("8-bit m, v" if "8bit" in s.optim else "fp32 m, v")
    else:
        state = e if s.full else 4
        per = optimizer_bytes_per_param(s.optim, state)
        opt = T * per
        detail = ("8-bit m, v" if "8bit" in s.optim else f"m, v in {8 * state}-bit")
        if "paged" in s.optim:
            detail += " (paged: spills to CPU under pressure)"
    if offload:
        host += opt / P
        rows.append(Row("optimizer", 0.0, "offloaded to CPU (DeepSpeed CPUAdam)"))
    elif s.strategy in ("zero1", "zero2", "zero3", "fsdp2"):
        rows.append(Row("optimizer", opt / P, detail + f", 1/{P} partition"))
    else:
        rows.append(Row("optimizer", opt, detail))

    # --- reference / value / reward models of the alignment stages
    extra_models = 0
    if s.stage in ("dpo", "kto") and s.full:
        extra_models = 1  # frozen reference copy (with an adapter the reference is the base, adapter disabled)
    if s.stage == "ppo":
        extra_models = 2 + (1 if s.full else 0)  # value model + reward model (+ reference copy when full)
        notes.append("ppo: value and reward models assumed the size of the policy")
    if s.stage == "rloo" and s.full:
        extra_models = 1  # frozen reference copy when rloo.beta > 0 (with an adapter: a copy of the adapter only)
    if s.stage == "distill":
        extra_models = 1
        notes.append("distill: teacher assumed the size of the student")
    if extra_models:
        copy = base / P if sharded else base
        rows.append(Row("reference/value", extra_models * copy, f"{extra_models} frozen copies of the base"))

    # --- activations
    decoder, logits = activation_bytes(shape, s)
    rows.append(Row("activations", decoder,
                    f"{s.micro_batch} x {s.seq_len} tokens, {shape.layers} layers"
                    + (", checkpointed" if s.checkpointing else "")))
    rows.append(Row("logits + loss", logits, f"vocab {shape.vocab:,}, fp32 log-softmax"))

    step_temp = 0.0 if mixed or offload else T * (4 if not s.full else e)  # foreach AdamW temporaries
    static = sum(r.bytes for r in rows if r.name in ("weights", "adapter", "optimizer", "reference/value"))
    moving_grads = sum(r.bytes for r in rows if r.name in ("gradients", "ddp buckets")) + step_temp
    peak = static + max(decoder + logits, moving_grads)
    if quantized and s.strategy == "fsdp2":
        notes.append("QLoRA + FSDP2: bnb_4bit_quant_storage = the compute dtype, cpu_ram_efficient_loading on")
    return Plan(s, shape, rows, peak, host, gpu_mem, notes, refused)


# ---------------------------------------------------------------------------------------------- recommendation


STRATEGY_COST = {"ddp": 1.0, "zero1": 1.02, "zero2": 1.05, "fsdp2": 1.12, "zero3": 1.2, "zero3_offload": 2.5}


def relative_step_time(s: Setup) -> float:
    """A coarse cost model to rank setups (lower = faster): tokens per GPU per optimizer step, × 1/3 more for
    recomputed forwards, × dequantization cost, × communication cost of the strategy, + a fixed per-micro-step
    overhead (kernel launches, optimizer) that larger micro-batches amortise."""
    work = s.grad_accum * (s.micro_batch + 0.5)
    if s.checkpointing:
        work *= 4 / 3
    work *= {"none": 1.0, "nf4": 1.25, "fp4": 1.25, "int8": 1.6}[s.quant]
    if s.world > 1:
        work *= STRATEGY_COST[s.strategy] * (1.15 if s.nodes > 1 else 1.0)
    elif s.strategy == "zero3_offload":
        work *= STRATEGY_COST[s.strategy]
    if not s.full:
        work *= 0.75  # no weight gradients for the frozen base
    return work


def _divisors(n: int) -> list[int]:
    """Divisors of n in increasing order, in O(sqrt n) (a batch of 10^9 must not take minutes)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def candidates(base: Setup, lora_trainable: int | None) -> list[Setup]:
    """Setups that train the same thing with the same global batch: quantization (adapters only), strategy,
    micro-batch × accumulation, checkpointing; full fine-tuning falls back to LoRA only when nothing else fits."""
    per_device = base.micro_batch * base.grad_accum
    strategies = list(STRATEGIES) if base.world > 1 else ["ddp", "zero3_offload"]
    out = []
    methods = [(base.method, base.trainable_params)]
    if base.full and lora_trainable is not None:
        methods.append(("lora", lora_trainable))
    for method, trainable in methods:
        quants = ["none"] if method == "none" else sorted({base.quant, "none", "nf4"})
        for quant in quants:
            for strategy in strategies:
                for mb in _divisors(per_device):
                    for ckpt in (False, True):
                        out.append(replace(base, method=method, trainable_params=trainable, quant=quant,
                                           strategy=strategy, micro_batch=mb, grad_accum=per_device // mb,
                                           checkpointing=ckpt))
    return out


def recommend(shape: ModelShape, base: Setup, gpu_mem: float, lora_trainable: int | None = None) -> Plan | None:
    """The fastest setup that fits (ties: the smaller peak); full → LoRA only if no full setup fits."""
    fitting = [p for p in (estimate_setup(shape, c, gpu_mem) for c in candidates(base, lora_trainable)) if p.fits]
    if not fitting:
        return None
    same_method = [p for p in fitting if p.setup.method == base.method]
    pool = same_method or fitting
    return min(pool, key=lambda p: (relative_step_time(p.setup), p.peak))


# ---------------------------------------------------------------------------------------------- recipe → plan


def setup_from_recipe(recipe: Any, trainable: int, gpus: int = 1, nodes: int = 1, strategy: str | None = None,
                      stage: str | None = None) -> Setup:
    """The setup a recipe asks for. dtype `auto` plans for bf16 (what tunekit picks on a CUDA GPU)."""
    m, t = recipe.model, recipe.train
    quant = "int8" if m.load_in_8bit else (m.bnb_4bit_quant_type if m.load_in_4bit else "none")
    strategy = strategy or getattr(getattr(recipe, "launch", None), "strategy", None) or "ddp"
    if strategy == "auto":
        strategy = "ddp"
    if strategy not in STRATEGIES:
        raise TunekitError(f"--strategy '{strategy}': expected one of {', '.join(STRATEGIES)} or auto")
    return Setup(
        method=recipe.adapter.method, trainable_params=trainable, quant=quant,
        double_quant=m.bnb_4bit_double_quant, dtype_bytes=4 if m.dtype == "float32" else 2,
        strategy=strategy, gpus=gpus, nodes=nodes, micro_batch=t.batch_size, grad_accum=t.grad_accum,
        seq_len=recipe.data.max_length, checkpointing=t.gradient_checkpointing, optim=t.optim,
        stage=stage or recipe.stage, lora_dropout=recipe.adapter.dropout > 0, adapter_rank=recipe.adapter.r,
        adapted_modules=_adapted(recipe.adapter.targets),
    )


def _adapted(targets: str | list[str]) -> tuple[str, ...]:
    if targets == "all-linear" or targets == ["all-linear"]:
        return ADAPTABLE
    names = [targets] if isinstance(targets, str) else list(targets)
    return tuple(n for n in ADAPTABLE if any(n == t or t.endswith("." + n) for t in names))


def estimate(recipe: Any, gpu_mem: float | str, gpus: int = 1, nodes: int = 1, strategy: str | None = None,
             stage: str | None = None, recommend_fit: bool = True) -> Plan:
    """Plan a recipe for `gpus` × `nodes` GPUs of `gpu_mem` bytes (or "24GiB"), config.json only.

    `stage` overrides recipe.stage (rm/dpo/grpo/ppo/cai before the schema knows them); the plan's
    `recommendation` is the fastest setup that fits."""
    from tunekit.models.load import build_meta_model

    mem = parse_size(gpu_mem) if isinstance(gpu_mem, str) else float(gpu_mem)
    if gpus < 1 or nodes < 1:
        raise TunekitError("--gpus and --nodes must be at least 1")
    shape = shape_of(build_meta_model(recipe.model), recipe.model.name)
    trainable = shape.total_params if recipe.adapter.method == "none" else count_adapter(recipe)
    setup = setup_from_recipe(recipe, trainable, gpus, nodes, strategy, stage)
    plan = estimate_setup(shape, setup, mem)
    if recommend_fit:
        lora = count_adapter(recipe, "lora") if setup.full else None
        plan.recommendation = recommend(shape, setup, mem, lora)
    return plan


def apply_to_recipe(recipe: Any, setup: Setup) -> Any:
    """The recipe with the setup's method, quantization, batch, accumulation and checkpointing (and launch
    section, when the schema has one)."""
    foreign = recipe.foreign_sections() if hasattr(recipe, "foreign_sections") else set()
    data = recipe.model_dump(exclude=foreign)  # other stages' sections are refused on validation
    data["adapter"]["method"] = setup.method
    data["model"]["load_in_4bit"] = setup.quant in ("nf4", "fp4")
    data["model"]["load_in_8bit"] = setup.quant == "int8"
    if setup.quant in ("nf4", "fp4"):
        data["model"]["bnb_4bit_quant_type"] = setup.quant
    data["train"]["batch_size"] = setup.micro_batch
    data["train"]["grad_accum"] = setup.grad_accum
    data["train"]["gradient_checkpointing"] = setup.checkpointing
    if "launch" in data:
        data["launch"].update(gpus=setup.gpus, nodes=setup.nodes, strategy=setup.strategy)
    return type(recipe).model_validate(data)


def startup_estimate(recipe: Any, stage: str | None = None) -> tuple[str, bool] | None:
    """(one-line estimate, exceeds free memory) for the start of a training command on a CUDA GPU, else None.

    Uses the free memory of this process's GPU and the world size of the launch (WORLD_SIZE)."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = os.environ.get("TUNEKIT_STRATEGY") or None
    plan = estimate(recipe, float(free), gpus=world, strategy=strategy, stage=stage, recommend_fit=False)
    return plan.summary(), plan.peak > free
