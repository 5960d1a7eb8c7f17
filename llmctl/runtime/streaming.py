"""Text streaming on top of a backend's token stream: detokenize and apply stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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
    """Generate text chunk by chunk; the chunks' texts concatenate to the full answer.

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
