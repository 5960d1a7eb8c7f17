"""Text streaming on top of a backend's token stream: detokenize and apply stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.runtime.base import Backend, GenerationStep, SamplingParams
from llmctl.runtime.detokenize import IncrementalDetokenizer, StopStringMatcher


@dataclass
class TextChunk:
    """Text produced by one or more tokens of a generation.

    Attributes:
        text: the new text, possibly empty (an incomplete character or a held-back stop prefix).
        steps: the generated tokens this chunk accounts for.
        finish_reason: "stop" or "length" on the last chunk, else None.
    """

    text: str
    steps: list[GenerationStep] = field(default_factory=list)
    finish_reason: str | None = None


def stream_text(backend: Backend, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TextChunk]:
    """Generate text chunk by chunk; the chunks' texts concatenate to the full output.

    A stop string ends the generation (finish reason "stop") and appears in no chunk. The
    last chunk always carries the finish reason. Closing this iterator cancels the generation.

    Args:
        backend: a loaded backend.
        prompt_ids: the prompt token ids.
        params: decoding parameters, ``stop`` included.
    """
    detokenizer = IncrementalDetokenizer(backend.decode, prompt_ids)
    matcher = StopStringMatcher(params.stop)
    steps = backend.generate(prompt_ids, params)
    try:
        for step in steps:
            text = matcher.feed(detokenizer.add(step.token_id))
            if matcher.stopped:
                yield TextChunk(text, [step], "stop")
                return
            if step.finish_reason is not None:
                text += matcher.feed(detokenizer.flush())
                if matcher.stopped:
                    yield TextChunk(text, [step], "stop")
                    return
                yield TextChunk(text + matcher.flush(), [step], step.finish_reason)
                return
            yield TextChunk(text, [step])
        # A backend that stops without marking its last step (max_tokens < 1) still ends the stream.
        yield TextChunk(matcher.feed(detokenizer.flush()) + matcher.flush(), [], "length")
    finally:
        steps.close()  # type: ignore[attr-defined]


@dataclass
class GenerationResult:
    """The outcome of one prompt: the text and the figures a user or a benchmark reads."""

    backend: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float | None = None
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first one (the decode phase), None below two tokens."""
        if self.completion_tokens < 2 or self.time_to_first_token_s is None:
            return None
        decode_time = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_time if decode_time > 0 else None

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "time_to_first_token_s": self.time_to_first_token_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "total_s": self.total_s,
        }


class PromptRun:
    """One prompt through a loaded backend: iterate for text deltas, then read ``result``.

    Args:
        backend: a loaded backend.
        prompt: the prompt text, or the user message when ``chat`` is set.
        params: decoding parameters.
        chat: render ``prompt`` as one user message through the chat template.
    """

    def __init__(self, backend: Backend, prompt: str, params: SamplingParams, *, chat: bool = False) -> None:
        self.backend = backend
        self.params = params
        if chat:
            self.prompt_ids = backend.apply_chat_template([{"role": "user", "content": prompt}])
        else:
            self.prompt_ids = backend.encode(prompt)
        self.result = GenerationResult(backend=backend.name, prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        import time

        started = time.perf_counter()
        pieces: list[str] = []
        for chunk in stream_text(self.backend, self.prompt_ids, self.params):
            if chunk.steps and self.result.time_to_first_token_s is None:
                self.result.time_to_first_token_s = time.perf_counter() - started
            self.result.completion_tokens += len(chunk.steps)
            if chunk.finish_reason is not None:
                self.result.finish_reason = chunk.finish_reason
            if chunk.text:
                pieces.append(chunk.text)
                yield chunk.text
        self.result.total_s = time.perf_counter() - started
        self.result.text = "".join(pieces)


def run_prompt(
    model_path: Path,
    prompt: str,
    params: SamplingParams,
    *,
    chat: bool = False,
    backend: str = "auto",
    profile: str | Path | None = None,
    threads: int | None = None,
) -> PromptRun:
    """Load the model in ``model_path`` and prepare one prompt; iterate the result to generate.

    Raises:
        InputError, UnsupportedError, ProfileError, RuntimeBackendError: see ``open_backend``.
        UsageError: ``chat`` is set and the model has no chat template.
    """
    from llmctl.runtime import open_backend

    # One stream from the command line needs no batching engine and its background thread.
    options = {"continuous_batching": False} if backend in ("auto", "genai") else {}
    loaded = open_backend(model_path, backend, profile=profile, threads=threads, **options)
    return PromptRun(loaded, prompt, params, chat=chat)
