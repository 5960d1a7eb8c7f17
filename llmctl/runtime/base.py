"""The interface every runtime backend implements.

A backend wraps one loaded model. ``serve`` calls it from worker threads, ``generate`` and
``eval`` from the main thread.

Thread-safety contract, shared by every built-in backend:

- ``load`` and ``close`` are called once, from one thread, while no other call runs.
- After ``load`` returns, ``encode``, ``decode``, ``apply_chat_template``, ``generate``,
  ``score``, ``score_batch`` and ``next_token_logits`` may be called from several threads at
  once. A backend serializes internally whatever its runtime cannot run concurrently, so a
  caller never needs its own lock.
- A generation iterator belongs to the thread that consumes it; closing it from that thread
  (or letting it be garbage-collected) cancels the generation and frees its resources.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Capabilities:
    """Features a backend supports; the server returns 400 for a parameter the backend lacks."""

    logprobs: bool = True
    prompt_logprobs: bool = True
    logit_bias: bool = True
    penalties: bool = True
    json_schema: bool = False
    continuous_batching: bool = False


@dataclass
class SamplingParams:
    """Decoding parameters of one generation, in the OpenAI API's meaning.

    ``temperature == 0`` is greedy decoding. ``top_k == 0`` and ``top_p == 1`` disable those
    filters. The same ``seed`` with the same parameters and prompt gives the same tokens on one
    backend. ``stop`` strings are applied to the decoded text by the caller (see
    ``llmctl.runtime.streaming``), never shown in the output.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no log-probabilities; N >= 0: the chosen token's plus top N
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None  # the output must be JSON matching this schema

    def needs_logits(self) -> bool:
        """Return True when a parameter needs the logits in Python rather than a runtime's own sampler."""
        return (
            bool(self.logit_bias)
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.logprobs is not None
            or self.json_schema is not None
        )


@dataclass
class TokenLogprob:
    """The log-probability of one token, with the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationStep:
    """One generated token."""

    token_id: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" (end of sequence) or "length" on the last step


class Backend(abc.ABC):
    """A loaded model behind one interface.

    Args:
        model_path: an artifact folder, or a Hugging Face folder for the PyTorch backend.
        threads: intra-op threads; 0 lets the runtime choose.
    """

    name: str = "base"
    capabilities: Capabilities = Capabilities()

    def __init__(self, model_path: Path, *, threads: int = 0, **options: Any) -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        self.options = options

    @classmethod
    def can_load(cls, model_path: Path) -> bool:
        """Return True when this backend can run the model in ``model_path``."""
        return False

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model and tokenizer; raises ``RuntimeBackendError`` on failure."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum number of tokens (prompt plus generated) in one sequence."""

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation."""

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenize plain text; special-token text in ``text`` is not parsed as control tokens."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Turn token ids back into text."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Render chat messages through the model's template and return the prompt token ids.

        Special-token text inside a message's content stays plain text; only the template's
        own markup becomes control tokens.

        Raises:
            UsageError: the model has no chat template.
        """

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        """Yield generated tokens one by one until end of sequence or ``params.max_tokens``.

        Closing the iterator early cancels the generation and frees its resources.
        """

    @abc.abstractmethod
    def score(self, token_ids: Sequence[int], *, top_logprobs: int = 0) -> list[TokenLogprob | None]:
        """Return the log-probability of each token given the ones before it.

        The first entry is None (nothing precedes it). Used for prompt log-probabilities
        (``echo``), perplexity and multiple-choice scoring.

        Args:
            token_ids: the whole sequence to score.
            top_logprobs: how many most likely alternatives to list at each position.
        """

    def score_batch(self, sequences: Sequence[Sequence[int]], *, top_logprobs: int = 0) -> list[list[TokenLogprob | None]]:
        """Score several sequences; the default scores them one by one.

        A backend that batches them pads on the right, so each sequence's log-probabilities
        match ``score`` up to float rounding.
        """
        return [self.score(sequence, top_logprobs=top_logprobs) for sequence in sequences]

    def token_bytes(self, token_id: int) -> bytes | None:
        """Return the raw bytes of one token (part of a UTF-8 character for some), or None when unknown."""
        return None

    def check_json_schema(self, schema: dict[str, Any]) -> None:
        """Check that generation can be constrained to ``schema``; a backend whose capabilities
        include ``json_schema`` overrides this.

        Raises:
            InputError: the schema is invalid or uses a feature the backend cannot enforce.
        """
        raise NotImplementedError(f"the {self.name} backend does not constrain output to a JSON schema")

    def next_token_logits(self, token_ids: Sequence[int]) -> Any:
        """Return the logits over the vocabulary at every position of ``token_ids`` as a
        ``(len(token_ids), vocab)`` numpy array; used for parity against a reference model."""
        raise NotImplementedError(f"the {self.name} backend does not return full logits")

    def close(self) -> None:
        """Release the model; the default does nothing."""
