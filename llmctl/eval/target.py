"""The model under evaluation: a local runtime backend, or an OpenAI-compatible server (``client.py``).

Tasks talk to a target through the few operations below, so the same task code measures an
artifact folder, a Hugging Face folder and a remote server.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import InputError

logger = logging.getLogger(__name__)

Advance = Callable[[int], None]


@dataclass
class SpeedSample:
    """One timed generation."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    decode_s: float


@dataclass
class RollingScore:
    """Per-token log-probabilities of a document and what was scored."""

    logprobs: list[float]
    scored_text_bytes: int
    windows: int
    details: dict[str, Any] = field(default_factory=dict)


def perplexity_windows(count: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Split ``count`` tokens into sliding windows.

    Each window is ``(begin, end, first_target)``: the model reads tokens ``begin..end-1``
    and only positions ``first_target..end-1`` are scored, so every token from position 1 to
    the last is scored exactly once (position 0 has no context). This is the loop of the
    Hugging Face perplexity guide, except that the stride is capped at ``context - 1``: with
    stride equal to the context the guide's loop leaves the first token of every window
    unscored, because nothing precedes it inside the window.

    Args:
        count: number of tokens in the document.
        context: tokens per window.
        stride: tokens the window moves by.
    """
    if count < 2:
        return []
    stride = max(1, min(stride, context - 1))
    windows = []
    previous_end = 1
    for begin in range(0, count, stride):
        end = min(begin + context, count)
        if end > previous_end:
            windows.append((begin, end, previous_end))
            previous_end = end
        if end == count:
            break
    return windows


class LocalTarget:
    """A model loaded in this process through a runtime backend."""

    kind = "local"

    def __init__(self, backend: Any, *, batch_size: int = 1) -> None:
        self.backend = backend
        self.batch_size = max(1, batch_size)

    # --- log-likelihood ---------------------------------------------------------------

    def loglikelihood_unsupported(self) -> str | None:
        """Return why log-likelihood tasks cannot run, or None when they can."""
        return None

    def _score_many(self, sequences: Sequence[Sequence[int]], advance: Advance | None = None) -> list[list[float | None]]:
        """Score sequences in groups of ``batch_size``; the backend's ``score_batch`` is used when it has one."""
        score_batch = getattr(self.backend, "score_batch", None)
        results: list[list[float | None]] = []
        for start in range(0, len(sequences), self.batch_size):
            group = list(sequences[start:start + self.batch_size])
            if score_batch is not None and len(group) > 1:
                scored = score_batch(group)
            else:
                scored = [self.backend.score(ids) for ids in group]
            for entries in scored:
                results.append([None if entry is None else float(entry.logprob) for entry in entries])
            if advance:
                advance(len(group))
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize a (context, continuation) pair the way lm-evaluation-harness does.

        Trailing spaces of the context move to the continuation, the whole string is
        tokenized once, and the continuation is what follows the context's tokens, so
        a word is never split differently than in running text.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.backend.encode(context + continuation, add_special_tokens=False)
        context_ids = self.backend.encode(context, add_special_tokens=False)
        if not context_ids:
            # Nothing to condition on: start from the end-of-text token as the harness does.
            context_ids = [self.backend.eos_token_ids[0]]
            return context_ids, whole
        return context_ids, whole[len(context_ids):]

    def loglikelihoods(self, requests: Sequence[tuple[str, str]], advance: Advance | None = None) -> list[float]:
        """Return the summed log-probability of each continuation given its context.

        Sequences longer than the model's context keep their last tokens (the continuation
        always fits), as lm-evaluation-harness truncates them.
        """
        limit = self.backend.context_length
        sequences, continuation_lengths = [], []
        for context, continuation in requests:
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if not continuation_ids:
                raise InputError(f"choice {continuation!r} after context {context[-40:]!r} has no tokens of its own")
            sequence = (context_ids + continuation_ids)[-limit:]
            sequences.append(sequence)
            continuation_lengths.append(len(continuation_ids))

        scored = self._score_many(sequences, advance)
        totals = []
        for entries, length in zip(scored, continuation_lengths, strict=True):
            totals.append(float(sum(entries[-length:])))  # type: ignore[arg-type]
        return totals

    def rolling_logprobs(
        self, text: str, *, context: int, stride: int, max_tokens: int | None, max_windows: int | None,
        begin: Advance | None = None, advance: Advance | None = None,
    ) -> RollingScore:
        """Score every token of ``text`` once with a sliding window (see ``perplexity_windows``)."""
        context = min(context, self.backend.context_length)
        token_ids = self.backend.encode(text, add_special_tokens=False)
        if max_tokens is not None:
            token_ids = token_ids[:max_tokens]
        windows = perplexity_windows(len(token_ids), context, stride)
        if max_windows is not None:
            windows = windows[:max_windows]
        if not windows:
            raise InputError("the text has fewer than two tokens", hint="a perplexity task needs a longer text")
        if begin:
            begin(len(windows))

        scored = self._score_many([token_ids[begin:end] for begin, end, _ in windows], advance)
        logprobs: list[float] = []
        for (begin, _end, first), entries in zip(windows, scored, strict=True):
            logprobs.extend(float(value) for value in entries[first - begin:])  # type: ignore[arg-type]
        last_end = windows[-1][1]
        scored_text = self.backend.decode(token_ids[1:last_end], skip_special_tokens=False)
        return RollingScore(
            logprobs, len(scored_text.encode("utf-8")), len(windows),
            {"tokens": last_end, "context": context, "stride": min(stride, context - 1)},
        )

    # --- generation -------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None, messages: list[dict[str, str]] | None, chat: bool) -> list[int]:
        if messages is not None:
            return self.backend.apply_chat_template(messages, add_generation_prompt=True)
        if chat:
            return self.backend.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return self.backend.encode(prompt or "", add_special_tokens=True)

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int, *, seed: int, ignore_eos: bool = False) -> list[int]:
        """Greedily generate up to ``max_tokens`` token ids."""
        from llmctl.runtime.base import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed, ignore_eos=ignore_eos)
        return [step.token_id for step in self.backend.generate(list(prompt_ids), params)]

    def generate_text(
        self, prompt: str | None, messages: list[dict[str, str]] | None, *, chat: bool, max_tokens: int,
        stop: list[str], seed: int,
    ) -> str:
        """Greedily generate an answer and cut it at the first stop string."""
        generated = self.generate_ids(self.prompt_ids(prompt, messages, chat), max_tokens, seed=seed)
        eos = set(self.backend.eos_token_ids)
        text = self.backend.decode([t for t in generated if t not in eos], skip_special_tokens=True)
        return cut_at_stop(text, stop)

    # --- speed ------------------------------------------------------------------------

    def speed_prompt(self, text: str, prompt_tokens: int, output_tokens: int) -> list[int]:
        token_ids = self.backend.encode(text, add_special_tokens=True)
        room = max(1, self.backend.context_length - output_tokens)
        length = min(prompt_tokens, room)
        while len(token_ids) < length:
            token_ids = token_ids + token_ids
        return token_ids[:length]

    def measure_speed(self, text: str, prompt_tokens: int, output_tokens: int, repeats: int, advance: Advance | None = None) -> tuple[list[SpeedSample], float | None]:
        """Time one warm-up and ``repeats`` greedy generations that ignore end of sequence.

        Returns:
            The timed samples and the peak resident memory of this process in bytes while they ran.
        """
        from llmctl.runtime.base import SamplingParams

        prompt = self.speed_prompt(text, prompt_tokens, output_tokens)
        params = SamplingParams(max_tokens=output_tokens, temperature=0.0, seed=0, ignore_eos=True)
        samples = []
        with PeakMemory() as memory:
            for run in range(repeats + 1):
                started = time.perf_counter()
                first = last = None
                count = 0
                for _step in self.backend.generate(prompt, params):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
                if run == 0 or first is None or last is None:
                    continue  # the warm-up run fills caches and is not timed
                samples.append(SpeedSample(len(prompt), count, first - started, last - first))
                if advance:
                    advance(1)
        return samples, memory.peak

    def close(self) -> None:
        self.backend.close()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Return ``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker) if marker else -1
        if position >= 0:
            cut = min(cut, position)
    return text[:cut]


class PeakMemory:
    """Sample this process's resident memory in a thread and keep the maximum (bytes)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            rss = process.memory_info().rss
            self.peak = rss if self.peak is None else max(self.peak, rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._poll, name="llmctl-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
