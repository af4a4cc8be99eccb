"""The streaming merge engine: validate everything, then merge tensor by tensor (row chunk by row chunk)
to disk.

Peak memory is a few float32 chunks (see `methods.CHUNK_ELEMS`) plus, for the methods that need a whole tensor (ties,
breadcrumbs, model_stock, nuslerp, karcher, sce), one whole tensor per model; it does not grow with the model.
Nothing is written until every input, name, shape and parameter has been checked (plan.py).

The driver on top of the merge package: config.py (the YAML), sources.py (inputs), plan.py (what to write),
methods.py (the math), io.py (safetensors streaming), output.py (support files, card), tokenizer.py, adapters.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.merge.config import ADAPTER_SUM, MergeConfig, load_config
from tunekit.merge.io import ShardedWriter, parse_size
from tunekit.merge.methods import METHODS, REQUIRED, TensorInputs, row_chunks
from tunekit.merge.output import Log, byte_progress, copy_support_files, log_to_stderr, write_model_card
from tunekit.merge.plan import TensorPlan, plan_merge
from tunekit.merge.sources import check_not_quantized, open_source

DEFAULT_SHARD_SIZE = "5GB"


def _copies_values(plan: TensorPlan, vocab: Any) -> bool:
    """Whether the output tensor is its (only) input's values: non-float tensors and passthrough without `scale`.

    Those are copied row chunk by row chunk in their own dtype and cast straight to the output dtype, with no float32
    round trip (the same values: bf16/fp16 -> float32 is exact) and no float32 chunk in memory."""
    if plan.spec is None:
        return True
    return (
        plan.spec.name == "passthrough"
        and plan.tensor_params[0].get("scale") is None
        and not (vocab is not None and vocab.touches(plan))
    )


def merge_models(
    config: MergeConfig | str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Log = log_to_stderr,
) -> Path:
    """Merge the models of a mergekit-style config into `output` (a model folder), streaming tensor by
    tensor."""
    import torch
    import yaml

    from tunekit.run.atomic import atomic_output, check_output

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    max_shard = parse_size(shard_size)
    output = check_output(output, overwrite, inputs=[*cfg.model_names(), cfg.source])
    if cfg.merge_method == ADAPTER_SUM:
        from tunekit.merge.adapters import sum_adapters

        names = cfg.model_names()
        weights = [cfg.parameter("weight", m, "", 0.0) for m in names]
        return sum_adapters(names, weights, output, overwrite=overwrite)

    names = cfg.model_names()
    sources = {n: open_source(n) for n in names}
    for n, src in sources.items():
        check_not_quantized(src.path, n)
    plans, origin = plan_merge(cfg, sources, dtype)
    vocab = None
    if cfg.tokenizer_plan() is not None:
        from tunekit.merge.tokenizer import plan_vocabulary

        vocab = plan_vocabulary(cfg, sources, plans)  # None when every vocabulary already matches the output
        if vocab is not None:
            plans = [vocab.adapt(p) for p in plans]

    donor = sources[cfg.base_model or names[0]]
    out_dtypes = {p.out_dtype for p in plans if p.spec is not None}
    writer_plan = [(p.name, p.shape, p.out_dtype) for p in plans]
    torch_dtypes = {d: getattr(torch, d) for d in {p.out_dtype for p in plans}}

    with atomic_output(output, overwrite) as tmp:
        writer = ShardedWriter(tmp, writer_plan, max_shard, metadata={"tunekit": f"merge:{cfg.merge_method}"})
        bar, task = byte_progress(writer.total_size, progress)
        with bar:
            for plan in plans:
                if _copies_values(plan, vocab):
                    src, name = plan.sources[0]
                    for rows in row_chunks(plan.shape):
                        chunk = src.read(name, rows).to(torch_dtypes[plan.out_dtype])
                        writer.write(plan.name, chunk)
                        bar.advance(task, chunk.numel() * chunk.element_size())
                        del chunk
                    continue
                if vocab is not None and vocab.touches(plan):
                    readers = vocab.readers(plan)
                else:
                    readers = [(lambda rows, f=f, n=n: f.read(n, rows, torch.float32)) for f, n in plan.sources]
                inputs = TensorInputs(plan.name, plan.shape, readers, plan.base_index)
                for chunk in plan.spec.merge(inputs, plan.params, plan.tensor_params, seed):
                    chunk = chunk.to(torch_dtypes[plan.out_dtype])
                    writer.write(plan.name, chunk)
                    bar.advance(task, chunk.numel() * chunk.element_size())
                    del chunk
        writer.close()
        block = cfg.tokenizer_plan()
        tok_src = donor.path
        if block is not None and block.source not in ("base", "union"):
            tok_src = sources[block.source].path
        copy_support_files(donor.path, tok_src, tmp, out_dtypes.pop() if len(out_dtypes) == 1 else None)
        _write_out_config(tmp, origin, vocab.vocab_size if vocab is not None else None)
        if vocab is not None:
            vocab.save_tokenizer(tmp)
        if cfg.chat_template:
            from tunekit.merge.tokenizer import set_chat_template

            set_chat_template(tmp, cfg, sources, log)
        yaml_text = yaml.safe_dump(cfg.to_mergekit_dict(), sort_keys=False)
        write_model_card(tmp, f"Merge of {', '.join(names)}", cfg.merge_method, yaml_text)
        (tmp / "mergekit_config.yml").write_text(yaml_text)
    log(f"merged {len(names)} models with {cfg.merge_method} -> {output}")
    return output


def _write_out_config(out: Path, origin: list[tuple[str, int]] | None, vocab_size: int | None) -> None:
    """config.json of a `slices:` merge gets the new layer count (per-layer lists such as `layer_types` follow the
    layers they came from); a union tokenizer sets `vocab_size`."""
    file = out / "config.json"
    if not file.is_file() or (origin is None and vocab_size is None):
        return
    cfg = json.loads(file.read_text())
    if origin is not None:
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)
        old = cfg.get(key) if key else None
        if key:
            cfg[key] = len(origin)
        for k, v in list(cfg.items()):
            if isinstance(v, list) and old is not None and len(v) == old and k.startswith("layer_"):
                cfg[k] = [v[layer] for _, layer in origin]
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    file.write_text(json.dumps(cfg, indent=2) + "\n")


def short_config(
    method: str,
    models: list[str],
    *,
    base: str | None = None,
    t: float | None = None,
    weights: list[float] | None = None,
    density: float | None = None,
) -> MergeConfig:
    """The mergekit config the CLI short form stands for (e.g. `--method slerp --t 0.5 A B`)."""
    from tunekit.merge.config import validate_config

    if weights is not None and len(weights) != len(models):
        raise TunekitError(f"--weights: {len(weights)} values for {len(models)} models")
    raw: dict[str, Any] = {"merge_method": method}
    params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = [{} for _ in models]
    if method == "slerp":
        if len(models) == 1 and base:
            models = [base, *models]
            model_params.insert(0, {})
        if len(models) != 2:
            raise TunekitError("--method slerp merges exactly two models: A B (A is the t=0 end)")
        if t is None:
            raise TunekitError("--method slerp needs --t")
        raw["base_model"] = base or models[0]
        params["t"] = t
    else:
        if t is not None:
            raise TunekitError(f"--t is only used by slerp, not '{method}'")
        takes = METHODS[method].tensor_params if method in METHODS else {"weight": REQUIRED}
        if weights is not None and "weight" not in takes:
            raise TunekitError(f"--weights is not used by '{method}'")
        for i in range(len(models)):
            if "weight" in takes:
                model_params[i]["weight"] = weights[i] if weights is not None else 1.0
            if density is not None:
                model_params[i]["density"] = density
        if method in METHODS and METHODS[method].needs_base:
            if not base:
                raise TunekitError(f"--method {method} needs --base (task vectors are relative to it)")
            raw["base_model"] = base
        elif base and method in METHODS and METHODS[method].base_is_special:
            raw["base_model"] = base
        elif base:
            raise TunekitError(f"--base is not used by '{method}'")
    if density is not None and (method not in METHODS or "density" not in METHODS[method].tensor_params):
        raise TunekitError(f"--density is not used by '{method}'")
    raw["models"] = [
        {"model": m, **({"parameters": p} if p else {})} for m, p in zip(models, model_params, strict=True)
    ]
    if params:
        raw["parameters"] = params
    return validate_config(raw, source="command line")


def run_merge_command(
    *,
    inputs: list[str],
    output: Path | None,
    method: str | None,
    t: float | None,
    weights: str | None,
    density: float | None,
    base: str | None,
    adapter: str | None,
    overwrite: bool,
    dtype: str | None,
    shard_size: str,
    seed: int,
    progress: bool,
) -> Path:
    """Dispatch the three CLI forms (config, --method short form, --adapter) to the library functions."""
    if adapter is not None:
        if method or t is not None or weights or density is not None:
            raise TunekitError("--adapter takes only --base, -o, --dtype, --shard-size and --overwrite")
        if output is None and len(inputs) == 1:
            output = Path(inputs[0])
        elif inputs:
            raise TunekitError(f"unexpected arguments with --adapter: {' '.join(inputs)}")
        if output is None:
            raise TunekitError("missing output folder: pass -o OUT")
        from tunekit.merge.adapters import merge_adapter

        return merge_adapter(
            base, adapter, output, dtype=dtype, overwrite=overwrite, shard_size=shard_size, progress=progress
        )
    if method is not None:
        if output is None:
            raise TunekitError("missing output folder: pass -o OUT")
        if not inputs:
            raise TunekitError("no models given: tunekit merge --method METHOD A B -o OUT")
        parsed = None
        if weights is not None:
            try:
                parsed = [float(w) for w in weights.split(",")]
            except ValueError:
                raise TunekitError(f"--weights: cannot parse '{weights}' (example: 0.5,0.5)") from None
        cfg = short_config(method, inputs, base=base, t=t, weights=parsed, density=density)
    else:
        if not inputs:
            raise TunekitError("missing CONFIG.yml (or use --method / --adapter); see tunekit merge --help")
        if t is not None or weights or density is not None or base:
            raise TunekitError(
                "--t/--weights/--density/--base need --method (or --adapter); a config has its own"
            )
        if len(inputs) == 2 and output is None:
            output = Path(inputs[1])
        elif len(inputs) != 1:
            raise TunekitError("expected: tunekit merge CONFIG.yml OUTPUT_DIR")
        if output is None:
            raise TunekitError("missing OUTPUT_DIR")
        cfg = load_config(inputs[0])
    return merge_models(
        cfg, output, dtype=dtype, shard_size=shard_size, overwrite=overwrite, seed=seed, progress=progress
    )
