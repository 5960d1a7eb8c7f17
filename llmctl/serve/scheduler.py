"""Admission control and the bridge from a backend's blocking token iterator to asyncio.

Each sequence in flight takes a slot, and at most ``max_concurrency`` slots are taken at once.
Up to ``max_queue`` more requests wait for theirs in arrival order. Any request past that is
rejected with 429 at once rather than queued without bound. Each sequence runs ``Backend.generate`` in a thread of its own, so
several sequences are in flight together: a backend with continuous batching
(``llmctl.runtime.batching``) runs them in shared decode steps, the others interleave their
own steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from llmctl.runtime.base import Backend, GenerationStep, SamplingParams
from llmctl.runtime.streaming import stream_text
from llmctl.serve.errors import queue_full
from llmctl.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Scheduler:
    """Slots for running sequences and a bounded FIFO queue for waiting requests.

    A request takes one slot per sequence it generates (its prompts times ``n``), so
    ``max_concurrency`` bounds the sequences in flight, not just the requests.

    Args:
        max_concurrency: sequences that may hold a slot at once.
        max_queue: requests that may wait for slots; 0 rejects every request that finds too few free slots.
        metrics: where queue depth and running requests are reported.
        retry_after_s: the ``Retry-After`` value sent with 429.
    """

    def __init__(self, max_concurrency: int, max_queue: int, metrics: ServerMetrics, retry_after_s: int = 1) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._metrics = metrics
        self._running = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, slots: int = 1) -> Slot:
        """Wait until ``slots`` slots are free and return them; the caller must ``release()`` them.

        Raises:
            ValueError: ``slots`` is above ``max_concurrency``, which the caller checks first.
            APIError: 429 when too few slots are free and the queue is full.
        """
        if not 1 <= slots <= self.max_concurrency:
            raise ValueError(f"a request cannot take {slots} slots of {self.max_concurrency}")
        await self._acquire(slots)
        self._metrics.running.inc()
        return Slot(self, slots)

    async def _acquire(self, slots: int) -> None:
        if self._running + slots <= self.max_concurrency and not self._waiters:
            self._running += slots
            return
        if len(self._waiters) >= self.max_queue:
            raise queue_full(self.retry_after_s)

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (slots, waiter)
        self._waiters.append(entry)
        self._metrics.queue_depth.inc()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(slots)  # the slots were handed over just as the waiter went away
            else:
                # Another waiter's wake-up may already have dropped this cancelled entry.
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # a smaller request behind this one may fit now
            raise
        finally:
            self._metrics.queue_depth.dec()

    def _release_slots(self, slots: int) -> None:
        self._metrics.running.dec()
        self._release(slots)

    def _release(self, slots: int) -> None:
        self._running -= slots
        self._wake()

    def _wake(self) -> None:
        # Hand free slots to waiters in arrival order, and stop at the first that does not fit,
        # so a newcomer cannot overtake the queue and a large request is not starved.
        while self._waiters:
            slots, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self._running + slots > self.max_concurrency:
                return
            self._waiters.popleft()
            self._running += slots
            waiter.set_result(None)


class Slot:
    """Held slots; ``release()`` may be called more than once, only the first call counts."""

    def __init__(self, scheduler: Scheduler, slots: int = 1) -> None:
        self._scheduler = scheduler
        self._slots = slots
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._release_slots(self._slots)


@dataclass
class SequenceEvent:
    """What one sequence produced since its previous event.

    ``text`` is safe to show: it never ends inside a multi-byte character and never contains
    a stop string. ``steps`` are the generated tokens behind it (with log-probabilities when
    requested); the last event of a sequence carries ``finish_reason`` or ``error``.
    """

    index: int
    text: str = ""
    steps: list[GenerationStep] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class SequenceRequest:
    """One sequence to generate: ``index`` is its choice index in the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


class SequenceGroup:
    """Generate several sequences at once, each in a worker thread, read as one async stream of events.

    Leaving the ``async for`` over ``events()`` early (the client went away, or an error)
    makes every thread close its backend iterator after the token in progress, which frees
    the backend's batch slot; ``on_closed`` then runs, so a server slot is released only once
    the backend has stopped working for this request.

    Args:
        backend: the loaded model.
        sequences: what to generate.
        model_name: the label used in metrics.
        metrics: where token counts and latencies are recorded.
        on_closed: called on the event loop once no thread uses the backend any more
            (typically ``Slot.release``).
    """

    def __init__(
        self,
        backend: Backend,
        sequences: Sequence[SequenceRequest],
        *,
        model_name: str,
        metrics: ServerMetrics,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.sequences = list(sequences)
        self.model_name = model_name
        self.metrics = metrics
        self.completion_tokens = [0] * len(self.sequences)
        self._cancel = threading.Event()
        self._cancel_error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[SequenceEvent | int] = asyncio.Queue()
        self._threads = [
            threading.Thread(target=self._run, args=(position,), name="llmctl-generate", daemon=True)
            for position in range(len(self.sequences))
        ]
        self._threads_started = False
        self._threads_running = len(self._threads)
        self._on_closed = on_closed
        self._started = time.perf_counter()

    def cancel(self, error: BaseException | None = None) -> None:
        """Ask every worker thread to stop after the token in progress.

        Args:
            error: sent as each unfinished sequence's last event (the server is shutting
                down); None means the client has gone and no reader is left.
        """
        if error is not None and self._cancel_error is None:
            self._cancel_error = error
        self._cancel.set()

    def close(self) -> None:
        """Cancel what still runs and call ``on_closed`` once every thread has ended.

        Safe to call more than once and before ``events()`` has started the threads.
        """
        self.cancel()
        if not self._threads_started:
            self._threads_running = 0
            self._notify_closed()

    async def events(self) -> AsyncIterator[SequenceEvent]:
        """Start the threads and yield their events until every sequence has finished."""
        self._threads_started = True
        for thread in self._threads:
            thread.start()
        running = len(self._threads)
        try:
            while running:
                event = await self._queue.get()
                if isinstance(event, int):
                    running -= 1
                    continue
                yield event
        finally:
            if running:
                self.cancel()

    def _notify_closed(self) -> None:
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback()

    def _thread_ended(self, position: int) -> None:
        # Runs on the event loop, once per thread.
        self._queue.put_nowait(position)
        self._threads_running -= 1
        if self._threads_running == 0:
            self._notify_closed()

    def _put(self, event: SequenceEvent | int) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def _run(self, position: int) -> None:
        sequence = self.sequences[position]
        try:
            self._generate(position, sequence)
        except BaseException as error:  # noqa: BLE001 - handed to the request's task, which reports it
            self._put(SequenceEvent(sequence.index, error=error))
        finally:
            self._loop.call_soon_threadsafe(self._thread_ended, position)

    def _generate(self, position: int, sequence: SequenceRequest) -> None:
        params = sequence.params
        if params.max_tokens == 0:
            self._put(SequenceEvent(sequence.index, finish_reason="length"))
            return

        chunks = stream_text(self.backend, sequence.prompt_ids, params)
        previous = self._started
        try:
            for chunk in chunks:
                now = time.perf_counter()
                for _ in chunk.steps:
                    first = self.completion_tokens[position] == 0
                    latency = self.metrics.time_to_first_token if first else self.metrics.inter_token_latency
                    latency.labels(self.model_name).observe(now - previous)
                    previous = now
                    self.completion_tokens[position] += 1

                self._put(SequenceEvent(sequence.index, chunk.text, chunk.steps, chunk.finish_reason))
                if chunk.finish_reason is not None:
                    return
                if self._cancel.is_set():
                    if self._cancel_error is not None:
                        self._put(SequenceEvent(sequence.index, error=self._cancel_error))
                        return
                    self.metrics.cancelled.labels(self.model_name).inc()
                    logger.info("generation cancelled after %d tokens", self.completion_tokens[position])
                    return
        finally:
            chunks.close()
            self.metrics.generation_tokens.labels(self.model_name).inc(self.completion_tokens[position])

        # The backend ended without marking its last step.
        finish_reason = "length" if self.completion_tokens[position] >= params.max_tokens else "stop"
        self._put(SequenceEvent(sequence.index, finish_reason=finish_reason))
