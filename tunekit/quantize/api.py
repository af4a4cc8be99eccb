"""`tunekit quantize`: resolve the source (model folder, adapter, run directory or model name), quantize to
GGUF / GPTQ / AWQ / bitsandbytes, optionally verify, and write a run card next to the output."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.run.atomic import atomic_output, check_output

FORMATS = ("gguf", "gptq", "awq", "bnb")
DEFAULT_TYPES = {"gguf": "Q8_0", "gptq": "W4A16", "awq": "W4A16", "bnb": "NF4"}
BNB_TYPES = ("NF4", "FP4", "INT8")
CARD_NAME = "run_card.json"


# ---------------------------------------------------------------------------------------------- sources
def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def _resolve_name(name: str) -> Path:
    from tunekit.models.load import resolve_model_path

    path = Path(name).expanduser()
    if path.exists():  # a model, adapter or run folder
        return path
    resolved = Path(resolve_model_path(name))
    if not resolved.exists():
        raise TunekitError(f"source '{name}' is neither a local path nor a known model alias")
    return resolved


def _merge(adapter: Path, workdir: Path) -> Path:
    from tunekit.merge.adapters import merge_adapter

    return Path(merge_adapter(None, adapter, workdir / "merged", overwrite=True))


def resolve_source(source: str | Path, workdir: Path) -> tuple[Path, str]:
    """(HF model folder, kind). Adapters and run directories with an adapter are merged into their base
    (kept at its 16-bit dtype) inside `workdir` first."""
    from tunekit.run.locate import locate

    if Path(source).expanduser().is_file():
        raise TunekitError(f"source '{source}' is a file; expected a model folder, an adapter or a run directory")
    loc = locate(source)
    if loc is None:  # an alias or hub id
        return _resolve_name(str(source)), "model"
    if loc.model_dir is not None:
        from tunekit.models.sizes import check_config_sizes
        from tunekit.run.locate import read_json_config

        check_config_sizes(read_json_config(loc.model_dir / "config.json"), str(loc.model_dir / "config.json"))
        if not _is_model_folder(loc.model_dir):
            raise TunekitError(f"'{loc.model_dir}' has a config.json but no *.safetensors weights")
        return loc.model_dir, loc.kind
    return _merge(loc.path, workdir), loc.kind


# ---------------------------------------------------------------------------------------------- calibration
def read_texts(spec: str | Path, tokenizer: Any = None, limit: int | None = None) -> list[str]:
    """Calibration / evaluation texts: a .txt file (paragraphs split on blank lines) or any dataset spec
    tunekit reads (jsonl/json/csv/parquet files or folders, hub ids; see tunekit.data.sources). Records with a
    `text` field are used as they are; chat records (messages, sharegpt, alpaca, prompt/completion) are
    rendered with the tokenizer's chat template."""
    from tunekit.data.formats import to_messages
    from tunekit.data.sources import read_source

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".txt":
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        texts = []
        for rec in read_source(str(spec)):
            if isinstance(rec.data.get("text"), str):
                texts.append(rec.data["text"])
                continue
            messages = to_messages(rec.data, "auto", rec.where)
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise TunekitError(f"calibration data '{spec}' holds no text")
    return texts[:limit] if limit is not None else texts


def _calibration(spec: str | Path | None, folder: Path, samples: int) -> tuple[list[str], str]:
    """Calibration texts: `spec` (a dataset), or the built-in text when None or "builtin"."""
    from transformers import AutoTokenizer

    if spec is None or str(spec) == "builtin":
        from tunekit.quantize.verify import default_eval_texts

        return default_eval_texts("calibration")[:samples], "builtin:pydoc-topics (calibration split)"
    tok = AutoTokenizer.from_pretrained(folder)
    return read_texts(spec, tok, samples), str(spec)


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _bar(description: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _source_gguf_type(folder: Path) -> str:
    """Lossless intermediate GGUF type for llama.cpp's quantizer: the source's own float type."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                dt = str(sf.get_slice(k).get_dtype()).upper()
                return {"BF16": "BF16", "F16": "F16"}.get(dt, "F32")
    return "F32"


def normalize_type(fmt: str, qtype: str | None) -> str:
    from tunekit.quantize.gguf_writer import DIRECT_TYPES
    from tunekit.quantize.llamacpp import LLAMA_TYPES

    qtype = (qtype or DEFAULT_TYPES[fmt]).upper()
    if fmt == "gguf" and qtype not in DIRECT_TYPES and qtype not in LLAMA_TYPES:
        raise TunekitError(
            f"--type {qtype} is not a GGUF type; direct: {', '.join(DIRECT_TYPES)}; "
            f"via llama.cpp: {', '.join(LLAMA_TYPES)}"
        )
    if fmt in ("gptq", "awq") and qtype not in ("W4A16", "W4"):
        raise TunekitError(f"--type {qtype} is not supported for {fmt} (W4A16)")
    if fmt == "bnb" and qtype not in BNB_TYPES:
        raise TunekitError(f"--type {qtype} is not supported for bnb ({', '.join(BNB_TYPES)})")
    return "W4A16" if qtype == "W4" else qtype


def _check_text_inputs(
    fmt: str, qtype: str, calibration: str | Path | None, eval_text: str | Path | None, verify: bool
) -> None:
    """Every text input is checked before the first byte is written: a path that does not exist is an error even
    where the option has no effect (and that it has none is said, so the user is not misled)."""
    from tunekit.models.resolve import looks_like_path
    from tunekit.quantize.gguf_writer import DIRECT_TYPES

    for flag, spec in (("--calibration", calibration), ("--eval-text", eval_text)):
        if spec is None or str(spec) == "builtin":
            continue
        if not str(spec).strip():
            raise TunekitError(f"{flag}: empty path")
        path = Path(spec).expanduser()
        if looks_like_path(str(spec)) and not path.exists():
            raise TunekitError(f"{flag} '{spec}' not found")
    unused = fmt == "bnb" or (fmt == "gguf" and qtype in DIRECT_TYPES)
    if calibration is not None and unused:
        print(f"note: --calibration has no effect with --format {fmt} --type {qtype} (no calibration step); "
              "ignored", file=sys.stderr)
    if eval_text is not None and not verify:
        print("note: --eval-text has no effect without --verify; ignored", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- main entry
def quantize(
    source: str | Path,
    fmt: str,
    output: str | Path,
    *,
    qtype: str | None = None,
    calibration: str | Path | None = None,
    samples: int = 128,
    verify: bool = False,
    overwrite: bool = False,
    eval_text: str | Path | None = None,
    eval_tokens: int = 8192,
    ctx: int = 512,
    group_size: int = 128,
    progress: bool = True,
    embedding_type: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Quantize `source` to `output`; returns the run card (also written next to / inside the output).

    With `verify` or `strict` the export's chat template and stop tokens are checked against the training
    template (tunekit.quantize.template_check) before the output is put in place: a mismatch is a warning, an
    error with `strict`. A GGUF gets an Ollama Modelfile beside it; a folder a generation_config.json whose
    eos_token_id lists the end-of-turn tokens."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise TunekitError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    qtype = normalize_type(fmt, qtype)
    if samples < 1:
        raise TunekitError("--samples must be at least 1")
    _check_text_inputs(fmt, qtype, calibration, eval_text, verify)
    output = check_output(output, overwrite, inputs=[source, calibration, eval_text])
    report: dict[str, Any] = {"format": fmt, "type": qtype, "source": str(source), "output": str(output)}

    with tempfile.TemporaryDirectory(
        prefix="tunekit-quantize-", dir=output.parent if output.parent.exists() else None
    ) as td:
        work = Path(td)
        folder, kind = resolve_source(source, work)
        report["source_kind"] = kind
        report["model_folder"] = str(folder)
        from tunekit.chat.serving import write_generation_config
        from tunekit.quantize.template_check import check_export, training_tokenizer

        try:
            tok = training_tokenizer(source if kind != "model" else folder)
        except (TunekitError, OSError, ValueError):  # no tokenizer saved: nothing to serve a chat with
            if verify or strict:
                raise
            tok = None

        def check(tmp: Path) -> dict[str, Any] | None:
            if not (verify or strict):
                return None
            return check_export(source, tmp, fmt, strict, tok=tok, label=str(output)).as_dict()

        t0 = time.perf_counter()
        if fmt == "gguf":
            report.update(
                _to_gguf(folder, output, qtype, calibration, samples, overwrite, work, progress, embedding_type,
                         check)
            )
            from tunekit.chat.serving import run_system_prompt
            from tunekit.quantize.modelfile import write_modelfile

            if tok is not None:
                report["modelfile"] = write_modelfile(output, tok, run_system_prompt(source))
        elif fmt in ("gptq", "awq"):
            from tunekit.quantize.compressed import quantize_w4a16

            texts, origin = _calibration(calibration, folder, samples)
            with atomic_output(output, overwrite, is_dir=True) as tmp:
                report.update(quantize_w4a16(folder, tmp, fmt, texts, samples=samples, group_size=group_size))
                if tok is not None:
                    report["eos_token_id"] = write_generation_config(tmp, tok)
                report["template_check"] = check(tmp)
            report["calibration"] = origin
        else:
            from tunekit.quantize.bnb import quantize_bnb

            with atomic_output(output, overwrite, is_dir=True) as tmp:
                report.update(quantize_bnb(folder, tmp, qtype))
                if tok is not None:
                    report["eos_token_id"] = write_generation_config(tmp, tok)
                report["template_check"] = check(tmp)
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mb_export"] = round(_peak_rss_mb(), 1)
        if verify:
            report["verify"] = run_verify(folder, output, fmt, eval_text, eval_tokens, ctx, progress)
        report["peak_rss_mb_total"] = round(_peak_rss_mb(), 1)
        _write_card(output, report)
    return report


def _to_gguf(
    folder: Path,
    output: Path,
    qtype: str,
    calibration: str | Path | None,
    samples: int,
    overwrite: bool,
    work: Path,
    progress: bool,
    embedding_type: str | None = None,
    check: Any = None,
) -> dict[str, Any]:
    """Write the GGUF; `check(tmp)` runs on the finished file before it is renamed into place."""
    from tunekit.quantize import llamacpp
    from tunekit.quantize.gguf_writer import DIRECT_TYPES, write_gguf

    out: dict[str, Any] = {}
    if qtype in DIRECT_TYPES:
        with atomic_output(output, overwrite, is_dir=False) as tmp, _bar(f"GGUF {qtype}", progress) as cb:
            out["gguf"] = write_gguf(folder, tmp, qtype, embedding_type=embedding_type, name=folder.name, progress=cb)
            if check is not None:
                out["template_check"] = check(tmp)
        out["quantizer"] = "gguf-py"
        return out

    llamacpp.require_llama_cpp()
    base_type = _source_gguf_type(folder)
    base = work / f"base-{base_type}.gguf"
    with _bar(f"GGUF {base_type} (for llama.cpp)", progress) as cb:
        out["gguf"] = write_gguf(folder, base, base_type, name=folder.name, progress=cb)
    imatrix = None
    if calibration is not None or qtype in llamacpp.WANTS_IMATRIX:
        texts, origin = _calibration(calibration, folder, samples)
        imatrix = llamacpp.compute_imatrix(folder, texts)
        out["imatrix"] = {"calibration": origin, "texts": len(texts), "entries": len(imatrix)}
    log = work / "llama.log"
    with atomic_output(output, overwrite, is_dir=False) as tmp, llamacpp.log_to(log):
        llamacpp.llama_quantize(base, tmp, qtype, imatrix=imatrix, embedding_type=embedding_type)
        if check is not None:
            out["template_check"] = check(tmp)
    kept = output.with_name(output.name + ".llama.log")
    shutil.move(str(log), kept)
    out["quantizer"] = "llama.cpp llama_model_quantize"
    out["llama_log"] = str(kept)
    out["fallbacks"] = llamacpp.fallback_summary(kept.read_text(encoding="utf-8", errors="replace"))
    return out


def run_verify(
    folder: Path,
    output: Path,
    fmt: str,
    eval_text: str | Path | None = None,
    eval_tokens: int = 8192,
    ctx: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of source and quantized model, top-1 agreement, sizes and bits per weight."""
    from transformers import AutoTokenizer

    from tunekit.quantize import verify as V

    tok = AutoTokenizer.from_pretrained(folder)
    texts = read_texts(eval_text, tok) if eval_text is not None else V.default_eval_texts("eval")
    ids = V.eval_ids(tok, texts, eval_tokens)
    if len(ids) < 2:
        raise TunekitError("evaluation text is too short")
    src_fn = V.hf_logits_fn(folder)
    q_fn = V.gguf_logits_fn(output, ctx) if fmt == "gguf" else V.hf_logits_fn(output)
    with _bar("verify", progress) as cb:
        res = V.compare(src_fn, q_fn, ids, ctx, progress=cb)
    n_params = V.folder_params(folder)
    src_bytes = V.path_size(folder)
    out_bytes = V.path_size(output)
    res.update(
        eval_text=str(eval_text) if eval_text else "builtin:pydoc-topics (eval split)",
        ctx=ctx,
        source_bytes=src_bytes,
        output_bytes=out_bytes,
        source_bpw=8.0 * src_bytes / n_params,
        output_bpw=V.gguf_bits_per_weight(output)[0] if fmt == "gguf" else 8.0 * out_bytes / n_params,
        parameters=n_params,
    )
    return res


def card_path(output: str | Path) -> Path:
    output = Path(output)
    return output / CARD_NAME if output.is_dir() else output.with_name(output.name + ".card.json")


def _write_card(output: Path, report: dict[str, Any]) -> None:
    card_path(output).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
