"""`tunekit chat TARGET [--compare OTHER]`: talk to a run, adapter, model, alias or .gguf file."""

from __future__ import annotations

import sys

import typer

from tunekit.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("chat", help="Chat with a run directory, adapter, model folder, hub id, alias or .gguf file "
                "(streamed; /help inside lists the commands).")(chat_cmd)


@user_errors
def chat_cmd(
    target: str = typer.Argument(..., help="Run directory, adapter folder, model folder, hub id, alias or .gguf."),
    compare: str = typer.Option(None, "--compare", help="A second target: each message goes to both."),
    system: str = typer.Option(None, "--system", help="System message (default: the run's data.system_prompt)."),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Answer length limit in tokens."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Answer this prompt and exit (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Non-interactive: one JSON line per answer."),
    base: str = typer.Option(None, "--base", help="Base model for an adapter folder that does not name one."),
    n_ctx: int = typer.Option(2048, "--ctx", help=".gguf targets: context length."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model folder's own Python code (never taken from a run dir)."
    ),
) -> None:
    from tunekit.chat.backends import GenParams, load_backend
    from tunekit.chat.serving import run_system_prompt
    from tunekit.chat.session import ChatSession, read_prompts
    from tunekit.cli.common import check_range

    check_range("--temperature", temperature, 0.0)
    check_range("--top-p", top_p, 0.0, 1.0)
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--ctx", n_ctx, 16)
    interactive = not prompt and sys.stdin.isatty()
    prompts = None
    if not interactive:
        prompts = [[{"role": "user", "content": p}] for p in prompt] if prompt else read_prompts(sys.stdin)
        if not prompts:
            return
    params = GenParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    backends = [load_backend(target, base, trust_remote_code, n_ctx)]
    if compare:
        backends.append(load_backend(compare, None, trust_remote_code, n_ctx))
    session = ChatSession(backends, params, system if system is not None else run_system_prompt(target))
    try:
        if prompts is None:
            session.interactive()
        else:
            session.batch(prompts, as_json)
    finally:
        for backend in backends:
            backend.close()

