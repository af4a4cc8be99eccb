"""`tunekit` entry point. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from tunekit import __version__

app = typer.Typer(
    name="tunekit",
    help="Fine-tune, align, merge and quantize LLMs: one recipe, one run directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tunekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on the terminal (also TUNEKIT_DEBUG=1)."),
) -> None:
    """tunekit: fine-tune, align, merge and quantize LLMs."""
    if debug:
        import os

        os.environ["TUNEKIT_DEBUG"] = "1"


def _register() -> None:
    # Only commands that work are registered. Each module exposes `register(app)`.
    import importlib

    for name in ("stage", "eval", "merge", "quantize", "cai", "plan", "chat", "run"):
        try:
            module = importlib.import_module(f"tunekit.cli.{name}")
        except ModuleNotFoundError as exc:  # command not built yet
            if exc.name == f"tunekit.cli.{name}":
                continue
            raise
        module.register(app)


_register()


def main() -> None:
    import sys

    from tunekit.launch.allocator import use_jemalloc

    use_jemalloc(sys.argv)  # training commands: once, before any tensor is allocated
    app()


if __name__ == "__main__":
    main()
