"""Fold adapters into their base model (streaming), and sum same-shaped summable adapters into one adapter.

Every adapter kind (its detection, merge plan, summable tensors) is one registration in tunekit.adapters; this
module only streams: `merge_adapter` applies a kind's plan tensor by tensor, so only one base tensor is in memory
at a time, and `sum_adapters` adds the summable tensors of N adapters of one kind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunekit.adapters import TensorEdits
from tunekit.errors import TunekitError
from tunekit.merge.io import SafetensorsFolder, ShardedWriter, normalize_dtype, parse_size
from tunekit.merge.output import Log, byte_progress, copy_support_files, log_to_stderr, write_model_card
from tunekit.merge.sources import ResolvedAdapter, check_not_quantized, resolve_adapter, resolve_model

__all__ = ["ResolvedAdapter", "adapter_edits", "base_chain", "merge_adapter", "resolve_adapter", "sum_adapters"]
FOUR_BIT_NOTE = (
    "note: the run trained on a 4-bit quantized base; merging into the 16-bit base weights on disk instead "
    "(merging into 4-bit weights changes generations, a known PEFT issue)"
)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TunekitError(f"{file}: cannot read JSON ({exc})") from None


def _load_tensors(file: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise TunekitError(f"adapter weights '{file}' not found")
    return load_file(str(file))


def adapter_edits(adapter: str | Path, base: SafetensorsFolder) -> TensorEdits:
    """The per-tensor edits that fold `adapter` (an adapter folder or a run directory) into `base` while
    streaming: what `merge_adapter` writes, for callers that stream the base themselves (model+lora)."""
    res = resolve_adapter(adapter)
    if res.kind.plan_merge is None:
        raise TunekitError(f"adapter '{res.folder}': type '{res.kind.name}' cannot be merged into a base model")
    return res.kind.plan_merge(res.folder, base)


def base_chain(base: str | Path) -> tuple[str, list[ResolvedAdapter]]:
    """(root model, earlier adapters in training order) when `base` is itself a run or adapter folder (a chained
    run: sft -> dpo), else (base, [])."""
    from tunekit.run.locate import locate

    earlier: list[ResolvedAdapter] = []
    name = str(base)
    for _ in range(64):
        loc = locate(name)
        if loc is None or loc.adapter_dir is None:
            root = str(loc.model_dir) if loc is not None and loc.model_dir is not None else name
            return root, earlier[::-1]
        res = resolve_adapter(loc.adapter_dir if loc.kind == "adapter" else loc.path)
        if res.recorded_base() is None:
            raise TunekitError(f"adapter '{res.folder}': no base model recorded")
        earlier.append(res)
        name = res.base_hint
    raise TunekitError(f"'{base}': a chain of more than 64 runs (a run that names itself?)")


# ------------------------------------------------------------------------------------------------ merge


def merge_adapter(
    base: str | Path | None,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    shard_size: str | int = "5GB",
    progress: bool = True,
    log: Log = log_to_stderr,
) -> Path:
    """Fold `adapter` (adapter folder or tunekit run dir) into `base` and write a full model folder to
    `output`.

    `base` None: the run's recipe `model.name`, else the adapter config's `base_model_name_or_path`.
    Streams the
    base tensor by tensor; tensors the adapter does not touch are copied (cast to `dtype` if given).
    """
    import torch

    from tunekit.run.atomic import atomic_output, check_output

    output = check_output(output, overwrite, inputs=[base, adapter])
    max_shard = parse_size(shard_size)
    out_dtype = normalize_dtype(dtype, "--dtype")
    res = resolve_adapter(adapter)
    if res.kind.plan_merge is None:
        raise TunekitError(f"adapter '{res.folder}': type '{res.kind.name}' cannot be merged into a base model")
    base_name = base if base is not None else res.recorded_base()
    if base_name is None:
        raise TunekitError(f"adapter '{res.folder}': no base model recorded; pass --base")
    root, earlier = base_chain(base_name)
    base_path = resolve_model(root)
    check_not_quantized(base_path, str(root))
    if res.load_in_4bit:
        log(FOUR_BIT_NOTE)
    folder = SafetensorsFolder(base_path, label=str(root))
    edits: TensorEdits = {}
    for step in [*earlier, res]:  # a chained run: the earlier adapters first, in training order
        for name, edit in adapter_edits(step.folder, folder).items():
            prev = edits.get(name)
            edits[name] = edit if prev is None else (lambda w, edit=edit, prev=prev: edit(prev(w)))
    plan = [(n, folder.info(n).shape, out_dtype or folder.info(n).dtype) for n in folder.names()]
    plan = [(n, s, d if folder.info(n).is_float else folder.info(n).dtype) for n, s, d in plan]
    with atomic_output(output, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard, metadata={"tunekit": f"merge:adapter:{res.kind.name}"})
        bar, task = byte_progress(writer.total_size, progress, "merging adapter")
        with bar:
            for name, shape, dt in plan:
                if name in edits:
                    chunks = [edits[name](folder.read(name, dtype=torch.float32))]
                else:
                    from tunekit.merge.methods import TensorInputs

                    rows_list = TensorInputs(name, shape, [], None).chunks()
                    chunks = (folder.read(name, rows) for rows in rows_list)
                for chunk in chunks:
                    chunk = chunk.to(getattr(torch, dt))
                    writer.write(name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
        writer.close()
        copy_support_files(base_path, base_path, tmp, out_dtype)
        # the run's tokenizer and chat template (a template set by the recipe lives in chat_template.jinja)
        copied_tok = [p.name for p in [*res.folder.glob("tokenizer*"), *res.folder.glob("chat_template.*"),
                                       *res.folder.glob("special_tokens_map.json")] if p.is_file()]
        for name in copied_tok:
            shutil.copy2(res.folder / name, tmp / name)
        if (tmp / "tokenizer_config.json").is_file():
            from tunekit.chat.serving import write_generation_config

            write_generation_config(tmp)  # transformers and vLLM stop at the run's end-of-turn token
        notes = [f"base: `{root}`", *(f"folded first: `{e.folder}` ({e.kind.name})" for e in earlier),
                 f"adapter: `{adapter}` ({res.kind.name})"]
        if res.load_in_4bit:
            notes.append("trained on a 4-bit base; merged into the 16-bit base weights")
        config_text = (
            (res.folder / res.kind.config_file).read_text()
            if (res.folder / res.kind.config_file).is_file()
            else ""
        )
        write_model_card(
            tmp,
            f"{Path(str(base_name)).name} + {Path(str(adapter)).name}",
            "adapter merge",
            config_text,
            notes,
        )
    log(f"merged adapter {adapter} into {base_name} -> {output}")
    return output


# ------------------------------------------------------------------------------------------------ adapter_sum


def sum_adapters(
    adapters: Sequence[str | Path],
    weights: Sequence[float],
    output: str | Path,
    *,
    overwrite: bool = False,
    log: Log = log_to_stderr,
) -> Path:
    """adapter_sum: one adapter whose trainable tensors are Σ_i w_i·T_i over N adapters of one summable type.

    The adapters must share type, config (same base fingerprint, ranks, targets) and every frozen tensor
    bit for
    bit; otherwise the sum is meaningless and this raises. Exact for types whose update is linear in the
    trainable tensors with shared frozen factors (LoRA-XS's R, SVFT's M); refused for plain LoRA.
    """
    import torch
    from safetensors.torch import save_file

    from tunekit.run.atomic import atomic_output, check_output

    output = check_output(output, overwrite, inputs=adapters)
    if len(adapters) < 2:
        raise TunekitError("adapter_sum needs at least two adapters")
    if len(weights) != len(adapters):
        raise TunekitError(f"adapter_sum: {len(adapters)} adapters but {len(weights)} weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TunekitError(f"adapter_sum: weight {w!r} is not a number")
    resolved = [resolve_adapter(a) for a in adapters]
    kind = resolved[0].kind
    for a, r in zip(adapters, resolved, strict=True):
        if r.kind.name != kind.name:
            raise TunekitError(
                f"adapter_sum: '{a}' is a {r.kind.name} adapter but '{adapters[0]}' is {kind.name}"
            )
    if kind.summable is None:
        raise TunekitError(f"adapter_sum: {kind.sum_refusal}")
    configs = []
    for r in resolved:
        file = r.folder / kind.config_file
        cfg = _read_json(file) if file.is_file() else {}
        configs.append({k: v for k, v in cfg.items() if k not in kind.ignore_config_keys})
    for a, cfg in zip(adapters[1:], configs[1:], strict=True):
        for key in sorted(set(cfg) | set(configs[0])):
            if cfg.get(key) != configs[0].get(key):
                raise TunekitError(
                    f"adapter_sum: '{a}' and '{adapters[0]}' differ in config key '{key}' "
                    f"({cfg.get(key)!r} vs {configs[0].get(key)!r}); only identically configured "
                    "adapters of the same base can be summed"
                )
    tensors = [_load_tensors(r.folder / kind.weights_file) for r in resolved]
    out: dict[str, Any] = {}
    for name, first in tensors[0].items():
        for a, t in zip(adapters[1:], tensors[1:], strict=True):
            if name not in t or t[name].shape != first.shape:
                raise TunekitError(f"adapter_sum: tensor '{name}' is missing or has another shape in '{a}'")
        if kind.summable(name):
            acc = torch.zeros(first.shape, dtype=torch.float32)
            for w, t in zip(weights, tensors, strict=True):
                acc.add_(t[name].to(torch.float32), alpha=float(w))
            out[name] = acc.to(first.dtype)
        else:
            for a, t in zip(adapters[1:], tensors[1:], strict=True):
                if not torch.equal(t[name], first):
                    raise TunekitError(
                        f"adapter_sum: frozen tensor '{name}' differs between '{adapters[0]}' and '{a}' "
                        "(different initialisation or base); they cannot be summed"
                    )
            out[name] = first
    for a, t in zip(adapters[1:], tensors[1:], strict=True):
        extra = set(t) - set(tensors[0])
        if extra:
            raise TunekitError(f"adapter_sum: tensor '{sorted(extra)[0]}' of '{a}' is not in '{adapters[0]}'")
    with atomic_output(output, overwrite) as tmp:
        for p in resolved[0].folder.iterdir():
            if p.is_file() and p.name != kind.weights_file:
                shutil.copy2(p, tmp / p.name)
        save_file(out, str(tmp / kind.weights_file), metadata={"format": "pt"})
        summary = ", ".join(f"{w} x {a}" for w, a in zip(weights, adapters, strict=True))
        (tmp / "README.md").write_text(
            f"# adapter_sum\n\nMade with `tunekit merge` (adapter_sum): {summary}\n"
        )
        if kind.finalize is not None:
            kind.finalize(tmp)
    log(f"summed {len(adapters)} {kind.name} adapters -> {output}")
    return output
