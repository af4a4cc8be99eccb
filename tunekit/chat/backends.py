"""Backends `tunekit chat` talks to: transformers for runs, adapters and model folders (adapters and chains are
folded in memory by the same loader as every other command), llama.cpp (llama-cpp-python) for `.gguf` files.

Both stream text pieces as tokens are generated and stop at the model's end-of-turn tokens. Sampling: greedy
when temperature is 0, else temperature + nucleus sampling (Holtzman et al., 2020, top-p).
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError

Messages = list[dict[str, str]]


@dataclass
class GenParams:
    """Sampling settings shown and changed by `/params`."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set(self, key: str, value: str) -> None:
        if key not in self.as_dict():
            raise TunekitError(f"unknown parameter '{key}' (known: {', '.join(self.as_dict())})")
        try:
            parsed: Any = None if value.lower() == "none" and key == "seed" else (
                float(value) if key in ("temperature", "top_p") else int(value))
        except ValueError:
            raise TunekitError(f"{key}: '{value}' is not a number") from None
        if key == "temperature" and parsed < 0 or key == "top_p" and not 0 < parsed <= 1:
            raise TunekitError(f"{key}: {value} is out of range")
        if key == "max_new_tokens" and parsed < 1:
            raise TunekitError("max_new_tokens: must be at least 1")
        setattr(self, key, parsed)


class Backend:
    """A loaded model that answers a conversation, streaming text pieces."""

    name: str = ""

    def stream(self, messages: Messages, params: GenParams, stop: threading.Event) -> Iterator[str]:
        raise NotImplementedError

    def answer(self, messages: Messages, params: GenParams) -> str:
        return "".join(self.stream(messages, params, threading.Event())).strip()

    def close(self) -> None:
        """Free native resources (llama.cpp) before the interpreter shuts down."""


class TransformersBackend(Backend):
    """A run directory, adapter folder, model folder, hub id or alias through transformers' `generate` with a
    `TextIteratorStreamer` (generation runs in a worker thread; the main thread prints pieces as they come)."""

    def __init__(self, target: str, base: str | None = None, trust_remote_code: bool = False) -> None:

        from tunekit.chat.serving import stop_ids
        from tunekit.models.trained import load_any

        self.name = target
        self.model, self.tok = load_any(target, base, trust_remote_code)
        self.model.eval()
        self.stop_ids = stop_ids(self.tok, getattr(self.model, "generation_config", None))
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop_ids[0]
        self.device = next(self.model.parameters()).device  # generate() runs under no_grad itself

    def prompt_ids(self, messages: Messages) -> list[int]:
        from tunekit.data.templates import render

        text = render(self.tok, messages, generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def stream(self, messages: Messages, params: GenParams, stop: threading.Event) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor([self.prompt_ids(messages)], device=self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, streamer=streamer, use_cache=True,
            stopping_criteria=StoppingCriteriaList([_Stop()]),
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]


class LlamaCppBackend(Backend):
    """A `.gguf` file through llama-cpp-python: the file's embedded chat template rendered as llama-cpp-python's
    chat handler does (tunekit.quantize.template_check.render_gguf), its tokenizer, its end-of-generation tokens."""

    def __init__(self, path: str | Path, n_ctx: int = 2048) -> None:
        from tunekit.quantize import llamacpp

        llama_cpp = llamacpp.require_llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise TunekitError(f"GGUF file '{path}' does not exist")
        self.name = str(path)
        self.llm = llamacpp.load(path, n_ctx=min(n_ctx, trained_context(path) or n_ctx), logits_all=False,
                                 kv_f32=False)
        if not self.llm.metadata.get("tokenizer.chat_template"):
            self.llm.close()
            raise TunekitError(f"'{path}' has no embedded chat template (tokenizer.chat_template); re-export it "
                               "with `tunekit quantize` from a model whose tokenizer has one")
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._llama_cpp = llama_cpp

    def prompt_ids(self, messages: Messages) -> list[int]:
        from tunekit.quantize.template_check import render_gguf

        text = render_gguf(self.llm, messages, generation_prompt=True)
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        self.llm.close()

    def is_stop(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def stream(self, messages: Messages, params: GenParams, stop: threading.Event) -> Iterator[str]:
        ids = self.prompt_ids(messages)
        if len(ids) >= self.llm.n_ctx():
            raise TunekitError(f"the conversation ({len(ids)} tokens) no longer fits the context "
                               f"({self.llm.n_ctx()}); /reset to start over")
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        greedy = params.temperature <= 0
        gen = self.llm.generate(ids, reset=True, temp=0.0 if greedy else params.temperature,
                                top_p=1.0 if greedy else params.top_p, top_k=1 if greedy else 0,
                                min_p=0.0, repeat_penalty=1.0)
        budget = min(params.max_new_tokens, self.llm.n_ctx() - len(ids))
        try:
            for n, token in enumerate(gen):
                if stop.is_set() or self.is_stop(token) or n >= budget:
                    break
                piece = decoder.decode(self.llm.detokenize([token], special=False))
                if piece:
                    yield piece
        finally:
            gen.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def trained_context(path: str | Path) -> int | None:
    """The GGUF's `<arch>.context_length` (read from its header, no weights loaded), else None."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    field = reader.get_field(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field.contents()) if field is not None else None


def load_backend(target: str, base: str | None = None, trust_remote_code: bool = False,
                 n_ctx: int = 2048) -> Backend:
    """The backend for `target`: a `.gguf` file → llama.cpp; anything else → transformers."""
    if target.lower().endswith(".gguf"):
        return LlamaCppBackend(target, n_ctx=n_ctx)
    return TransformersBackend(target, base, trust_remote_code)
