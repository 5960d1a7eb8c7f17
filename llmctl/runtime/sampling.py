"""Next-token selection over a logits vector, with numpy.

Backends whose runtime hands back logits (ONNX Runtime, PyTorch, and GenAI when a request
needs more than its built-in sampler) pick tokens here, so the OpenAI parameters mean the
same thing on every backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from llmctl.errors import RuntimeBackendError
from llmctl.runtime.base import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from llmctl.runtime.constraints import JsonConstraint


# Numbers of most likely tokens tried for top-p before sorting the whole vocabulary.
SORT_WINDOWS = (1024, 8192)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return ``log(softmax(logits))`` along the last axis, computed in float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_entries(logprobs: np.ndarray, count: int) -> list[tuple[int, float]]:
    """Return the ``count`` most likely ``(token_id, logprob)`` pairs, most likely first."""
    if count <= 0:
        return []
    count = min(count, logprobs.shape[-1])
    candidates = np.argpartition(-logprobs, count - 1)[:count]
    ordered = candidates[np.argsort(-logprobs[candidates], kind="stable")]
    return [(int(token), float(logprobs[token])) for token in ordered]


class Sampler:
    """Pick tokens one at a time for one generation.

    The logits go through logit bias, then presence and frequency penalties over the tokens
    generated so far (the formula in OpenAI's API reference), then temperature, top-k and top-p. Reported log-probabilities come from the model's raw distribution
    (before bias, penalties and temperature), as ``score`` returns them.

    Args:
        params: the decoding parameters.
        vocab_size: the width of the logits vectors.
        eos_token_ids: tokens masked out when ``params.ignore_eos`` is set.
        constraint: the grammar state when the output must match a JSON schema; tokens it
            does not allow are masked out before sampling.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        eos_token_ids: Iterable[int] = (),
        constraint: JsonConstraint | None = None,
    ) -> None:
        self.params = params
        self._constraint = constraint
        self.vocab_size = vocab_size
        # A None seed draws fresh entropy from the OS, so unseeded requests differ.
        self._rng = np.random.default_rng(params.seed)
        self._counts: Counter[int] = Counter()

        self._bias: np.ndarray | None = None
        if params.logit_bias:
            self._bias = np.zeros(vocab_size, dtype=np.float64)
            for token_id, bias in params.logit_bias.items():
                if 0 <= int(token_id) < vocab_size:
                    self._bias[int(token_id)] = float(bias)
        self._masked = [t for t in eos_token_ids if 0 <= t < vocab_size] if params.ignore_eos else []
        self._plain_greedy = (
            constraint is None
            and params.temperature <= 0 and params.logprobs is None and not params.logit_bias
            and not params.presence_penalty and not params.frequency_penalty
        )

    def step(self, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """Choose the next token from one position's logits.

        Args:
            logits: a ``(vocab,)`` array; a longer last axis (padded vocabularies) is cut.

        Returns:
            The token id and, when ``params.logprobs`` is set, its log-probability.
        """
        if self._plain_greedy:
            # Greedy decoding with nothing to adjust needs neither float64 nor a copy, which
            # matters when one thread samples every sequence of a batch. A masked winner
            # (an end-of-sequence token under ignore_eos) takes the full path.
            token = int(np.argmax(np.asarray(logits).reshape(-1)[: self.vocab_size]))
            if token not in self._masked:
                self._counts[token] += 1
                return token, None
        raw = np.asarray(logits, dtype=np.float64).reshape(-1)[: self.vocab_size]
        processed = self._process(raw)
        if self._constraint is not None:
            allowed = self._constraint.allowed()
            if not allowed.any():
                raise RuntimeBackendError("the JSON grammar allows no next token", hint="simplify the schema")
            processed[~allowed] = -np.inf
        token = self._choose(processed)
        if self._constraint is not None:
            self._constraint.accept(token)
        self._counts[token] += 1

        logprob = None
        if self.params.logprobs is not None:
            distribution = log_softmax(raw)
            logprob = TokenLogprob(token, float(distribution[token]), top_entries(distribution, self.params.logprobs))
        return token, logprob

    def _process(self, raw: np.ndarray) -> np.ndarray:
        processed = raw.copy()
        if self._bias is not None:
            processed += self._bias
        if self._counts and (self.params.presence_penalty or self.params.frequency_penalty):
            tokens = np.fromiter(self._counts.keys(), dtype=np.int64)
            counts = np.fromiter(self._counts.values(), dtype=np.float64)
            processed[tokens] -= counts * self.params.frequency_penalty + self.params.presence_penalty
        if self._masked:
            processed[self._masked] = -np.inf
        return processed

    def _choose(self, processed: np.ndarray) -> int:
        params = self.params
        if params.temperature <= 0:
            return int(np.argmax(processed))

        scaled = processed / params.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if params.top_k <= 0 and params.top_p >= 1.0:
            return self._draw(probs, None)
        candidates = self._candidates(probs)
        kept = probs[candidates]
        if params.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
            cutoff = int(np.searchsorted(np.cumsum(kept), params.top_p)) + 1
            candidates, kept = candidates[:cutoff], kept[:cutoff]
        return self._draw(kept, candidates)

    def _draw(self, probs: np.ndarray, token_ids: np.ndarray | None) -> int:
        """Draw one index by inverse transform sampling; ``token_ids`` maps it to a token."""
        cumulative = np.cumsum(probs)
        index = min(int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right")), probs.size - 1)
        return index if token_ids is None else int(token_ids[index])

    def _candidates(self, probs: np.ndarray) -> np.ndarray:
        """Return the token ids that top-k and top-p may keep, most likely first.

        Sorting a whole vocabulary costs milliseconds per token at 50k-250k entries, so only
        the most likely tokens are sorted when they already cover the top-p mass.
        """
        top_k, top_p = self.params.top_k, self.params.top_p
        limit = top_k if 0 < top_k < probs.size else probs.size
        if top_p < 1.0:
            for window in SORT_WINDOWS:
                if window >= limit:
                    break
                if np.partition(probs, probs.size - window)[probs.size - window :].sum() >= top_p:
                    limit = window
                    break
        if limit < probs.size:
            head = np.argpartition(-probs, limit - 1)[:limit]
        else:
            head = np.arange(probs.size)
        return head[np.argsort(-probs[head], kind="stable")]
