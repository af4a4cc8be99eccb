"""`tunekit quantize SOURCE --format gguf|gptq|awq|bnb --output PATH`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunekit.cli.common import one_command, user_errors


@user_errors
def quantize_cmd(
    source: str = typer.Argument(..., help="Model folder, adapter folder, run directory or model name."),
    fmt: str = typer.Option(..., "--format", "-f", help="gguf, gptq, awq or bnb."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .gguf file or folder."),
    qtype: str | None = typer.Option(
        None,
        "--type",
        "-t",
        help="gguf: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 (built in) or Q2_K Q3_K_M Q4_K_S Q4_K_M "
        "Q5_K_M Q6_K IQ4_XS ... (llama-cpp-python); gptq/awq: W4A16; bnb: NF4 FP4 INT8.",
    ),
    calibration: str | None = typer.Option(
        None,
        "--calibration",
        help="Calibration data: a .txt file or any dataset tunekit reads; `builtin` = the built-in text "
        "(also the default for GPTQ/AWQ and the IQ types). Given for a K-quant, it adds an importance matrix.",
    ),
    samples: int = typer.Option(128, "--samples", help="Calibration samples."),
    verify: bool = typer.Option(
        False, "--verify", help="Compare perplexity/top-1 with the source and print a table."
    ),
    eval_text: str | None = typer.Option(
        None, "--eval-text", help="Evaluation text for --verify (.txt/.jsonl)."
    ),
    group_size: int = typer.Option(
        128, "--group-size", help="gptq/awq group size (chosen down to divide widths)."
    ),
    embedding_type: str | None = typer.Option(
        None,
        "--embedding-type",
        help="gguf: type of the token-embedding and output matrices (e.g. F16 with Q8_0: closer to the source, "
        "larger file). Default: the file type (Q8_0 for 4/5-bit direct types).",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="A chat-template or stop-token mismatch between training and the export is an "
        "error (nothing written); --verify alone prints it as a warning."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Quantize a model (adapters are merged into their base first)."""
    from tunekit.cli.common import check_range

    check_range("--samples", samples, 1)
    check_range("--group-size", group_size, 1)
    from tunekit.quantize.api import card_path, quantize
    from tunekit.quantize.verify import print_table

    report = quantize(
        source,
        fmt,
        output,
        qtype=qtype,
        calibration=calibration,
        samples=samples,
        verify=verify,
        overwrite=overwrite,
        eval_text=eval_text,
        group_size=group_size,
        embedding_type=embedding_type,
        strict=strict,
    )
    for line in report.get("fallbacks", []):
        typer.echo(f"note: {line} (details: {report['llama_log']})", err=True)
    if verify:
        print_table(report)
    check = report.get("template_check")
    if check and check.get("ok"):
        typer.echo(f"chat template: training and served prompts match ({check['engine']}); stops at "
                   f"{', '.join(check['end_of_turn'])}", err=True)
    modelfile = report.get("modelfile")
    if modelfile:
        how = (f"template {modelfile['family']}" if modelfile["family"] else "no TEMPLATE: " + modelfile["note"])
        typer.echo(f"Ollama Modelfile: {modelfile['path']} ({how})", err=True)
    typer.echo(
        f"wrote {output} ({report['format']} {report['type']}, {report['export_seconds']:.1f} s); "
        f"card: {card_path(output)}"
    )


register = one_command("quantize", quantize_cmd)
