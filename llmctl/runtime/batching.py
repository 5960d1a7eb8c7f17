"""Continuous batching over one decoder graph whose attention updates its KV cache in place.

The GenAI model builder emits ``GroupQueryAttention``, which reads each sequence's length
from the row sums of ``attention_mask``. When a ``past_key_values`` input and its ``present``
output are bound to the same buffer, it writes the new keys and values into that buffer at
each sequence's own offset. So one buffer per cache tensor, shaped
``(rows, kv_heads, capacity, head_dim)``, contains every running sequence right-padded:

- a decode step runs every running sequence as one batch of one token each, so the weights
  are read once per step for all of them;
- a new sequence joins between steps: its prompt runs in chunks into a free row. Several
  prompts can be part-way in at once, and the shortest goes first on every other step, so a
  short request does not wait for a long prompt to finish;
- a finished or cancelled sequence leaves between steps: the last row moves into its place.

NOTE: written here rather than taken from ``og.Engine``. On CPU, onnxruntime-genai 0.12.2's
engine forms static batches of at most four, and a request added to a running batch waits for
the whole batch. Its ``remove_request`` does not stop a request already in a batch either, so a
client that disconnects would keep its slot.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.errors import RuntimeBackendError
from llmctl.runtime.base import GenerationStep
from llmctl.runtime.sampling import Sampler

if TYPE_CHECKING:
    from llmctl.runtime.ort import OnnxDecoder

logger = logging.getLogger(__name__)

# Prompt tokens run per prefill call: bounds the (tokens, vocab) logits array a prompt
# produces, and lets running sequences take a decode step between two chunks of a long prompt.
PREFILL_CHUNK = 256
# The chunk while other sequences are decoding, so they get a step every quarter second or so
# rather than every half second (SmolLM2-135M on 2 cores, 3,000-token prompt).
BUSY_PREFILL_CHUNK = 128
# The cache grows in steps of this many positions, so it is not reallocated every token.
CAPACITY_STEP = 256
# A cache larger than this is released once no sequence runs, and shrunk once the sequences
# still running need less than half of it (the cache is rows x the longest sequence).
IDLE_CACHE_BYTES = 256 * 2**20


def _allocate(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Return a zeroed array; a large one gets its own anonymous memory map.

    A freed memory map goes back to the operating system at once, where a large array from
    malloc can stay in the process heap after the long sequence that needed it has gone.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < 2**20:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)


def can_batch(path: Path, execution_provider: str) -> bool:
    """Return True when ``BatchEngine`` can run the decoder in ``path`` on ``execution_provider``.

    The engine binds its cache in host memory, so only the CPU provider qualifies.
    """
    return execution_provider == "cpu" and updates_cache_in_place(path)


def updates_cache_in_place(path: Path) -> bool:
    """Return True when the decoder's attention can share one KV buffer between past and present.

    That is ``GroupQueryAttention``, which the GenAI model builder emits; optimum's exports
    concatenate the cache with ordinary operators and cannot.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)


class TurnLock:
    """A lock handed to waiting threads in arrival order.

    Each generation loops "take the lock, run one step, release"; with a plain lock the
    releasing thread usually takes it straight back, so one request would starve the others.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the releasing thread hands the lock over before it sets the event

    def __exit__(self, *exc_info: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


@dataclass
class EngineStats:
    """Time the engine spent in model calls, for benchmarks; written by the engine thread only."""

    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    cache_moves: int = 0  # reallocations of the KV cache (each copies it)


@dataclass
class _Sequence:
    """One generation in the engine. Fields past ``tokens`` belong to the engine thread."""

    key: int
    prompt: list[int]
    budget: int
    sampler: Sampler
    stop_ids: frozenset[int]
    tokens: queue.Queue = field(default_factory=queue.Queue)
    length: int = 0  # positions of this sequence already in the cache
    generated: int = 0
    last_token: int = -1


class KVCache:
    """The shared cache buffers: one ``(rows, kv_heads, capacity, head_dim)`` array per cache input.

    Row ``i`` contains the ``i``-th running sequence. Positions past its length contain stale
    values that attention does not read.
    """

    def __init__(self, decoder: OnnxDecoder) -> None:
        self._decoder = decoder
        self.arrays: dict[str, np.ndarray] = {}
        self.rows = 0
        self.capacity = 0

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def reserve(self, rows: int, positions: int, limit: int) -> bool:
        """Make room for ``rows`` rows of ``positions`` positions; return True when the buffers moved."""
        if rows <= self.rows and positions <= self.capacity:
            return False
        new_rows = max(rows, self.rows, 1)
        if rows > self.rows:
            new_rows = max(rows, 2 * self.rows)
        new_capacity = self.capacity
        if positions > self.capacity:
            # Grow by half again at least, so a sequence that grows a token at a time causes
            # few reallocations (each copies the whole cache).
            target = max(positions, self.capacity + self.capacity // 2)
            new_capacity = min(limit, -(-target // CAPACITY_STEP) * CAPACITY_STEP)
            new_capacity = max(new_capacity, positions)
        arrays = {}
        for name, (heads, head_dim) in self._decoder.past_shapes.items():
            array = _allocate((new_rows, heads, new_capacity, head_dim), self._decoder.past_dtypes[name])
            old = self.arrays.get(name)
            if old is not None:
                array[: old.shape[0], :, : old.shape[2]] = old
            arrays[name] = array
        self.arrays, self.rows, self.capacity = arrays, new_rows, new_capacity
        return True

    def shrink(self, rows: int, positions: int, limit: int) -> bool:
        """Reallocate to about ``rows`` rows of ``positions`` positions (at most ``limit``) when
        that halves the buffers or better; return True when the buffers moved. Rows and
        positions past those must contain nothing in use."""
        new_rows = max(rows, 1)
        new_capacity = -(-max(positions, 1) // CAPACITY_STEP) * CAPACITY_STEP + CAPACITY_STEP
        new_capacity = max(min(new_capacity, limit), positions)
        if new_rows * new_capacity * 2 > self.rows * self.capacity:
            return False
        arrays = {}
        for name, old in self.arrays.items():
            array = _allocate((new_rows, old.shape[1], new_capacity, old.shape[3]), old.dtype)
            array[:, :, : min(new_capacity, old.shape[2])] = old[:new_rows, :, :new_capacity]
            arrays[name] = array
        self.arrays, self.rows, self.capacity = arrays, new_rows, new_capacity
        return True

    def move_row(self, source: int, target: int, length: int) -> None:
        if length:
            for array in self.arrays.values():
                array[target, :, :length] = array[source, :, :length]

    def swap_rows(self, first: int, second: int, first_length: int, second_length: int) -> None:
        for array in self.arrays.values():
            saved = array[first, :, :first_length].copy()
            array[first, :, :second_length] = array[second, :, :second_length]
            array[second, :, :first_length] = saved

    def release(self) -> None:
        self.arrays, self.rows, self.capacity = {}, 0, 0


class BatchEngine:
    """Runs every submitted generation in shared decode steps on a background thread.

    Other threads only submit sequences and cancel them; all model calls happen on the
    engine thread. Each sequence's steps go to its own queue as ``GenerationStep`` items, or
    an exception when a model call fails.

    Args:
        decoder: a decoder whose graph updates its cache in place (``updates_cache_in_place``).
        context_length: the maximum number of positions of one sequence.
        max_batch: the maximum number of sequences in one decode step; later ones wait for a free
            row. The server's scheduler admits at most --max-concurrency sequences anyway.
        step_lock: taken around every model call, so the backend can serialize them with
            its other users of the runtime.
    """

    def __init__(
        self,
        decoder: OnnxDecoder,
        *,
        context_length: int,
        max_batch: int = 64,
        step_lock: TurnLock | None = None,
    ) -> None:
        self._decoder = decoder
        self._step_lock = step_lock or TurnLock()
        self._context_length = context_length
        self._max_batch = max_batch
        self._cache = KVCache(decoder)
        self._bindings: dict[tuple[int, int], dict[str, Any]] = {}
        self._condition = threading.Condition()
        # Guarded by _condition.
        self._pending: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._stopping = False
        # Owned by the engine thread, changed with _condition held: the running sequences in
        # cache row order, then the sequences whose prompts are part-way in, in the rows after
        # them (prefilling[j] is in row len(running) + j).
        self._running: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []
        self._iterations = 0
        self._keys = itertools.count()
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="llmctl-batch", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        """Decode steps run so far."""
        return self.stats.decode_steps

    @property
    def active_requests(self) -> int:
        """Sequences waiting, being prefilled or decoding; for tests and metrics."""
        with self._condition:
            return len(self._pending) + len(self._running) + len(self._prefilling)

    def generate(
        self, prompt: list[int], budget: int, sampler: Sampler, eos_ids: Iterable[int], *, ignore_eos: bool = False
    ) -> Iterator[GenerationStep]:
        """Yield the steps of one generation; closing the iterator early cancels it.

        ``budget`` tokens at most; ``prompt`` plus ``budget`` must fit the context length.
        ``sampler`` picks each token; a token in ``eos_ids`` ends the generation unless
        ``ignore_eos`` is set.
        """
        sequence = _Sequence(
            key=next(self._keys),
            prompt=prompt,
            budget=budget,
            sampler=sampler,
            stop_ids=frozenset() if ignore_eos else frozenset(eos_ids),
        )
        return self._stream(sequence)

    def _stream(self, sequence: _Sequence) -> Iterator[GenerationStep]:
        if sequence.budget <= 0:
            return
        with self._condition:
            if self._stopping:
                raise RuntimeBackendError("the model is being unloaded", hint="retry once the server is back")
            self._pending.append(sequence)
            self._condition.notify()
        finished = False
        try:
            while not finished:
                item = sequence.tokens.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                with self._condition:
                    self._cancelled.add(sequence.key)
                    self._condition.notify()

    def stop(self) -> None:
        """Stop the thread; sequences still running get an error."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout=30)

    # The engine thread.

    def _run(self) -> None:
        while True:
            with self._condition:
                while not (self._pending or self._running or self._prefilling or self._stopping):
                    self._condition.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                while self._pending and len(self._running) + len(self._prefilling) < self._max_batch:
                    self._prefilling.append(self._pending.pop(0))
            if self._prefilling:
                index = self._next_prefill()
                try:
                    self._prefill_chunk(index)
                except Exception as error:  # a failed prompt fails its own sequence, not the batch
                    logger.exception("prompt of sequence %d failed", self._prefilling[index].key)
                    self._fail_prefilling(index, error)
            if self._running:
                try:
                    self._decode()
                except Exception as error:  # a failed decode step fails the sequences in it, not the thread
                    logger.exception("batched decode step failed; failing %d sequences", len(self._running))
                    self._fail_all(error)
            self._trim_cache()

        error = RuntimeBackendError("the model was unloaded during generation", hint="retry once the server is back")
        with self._condition:
            waiting, self._pending = self._pending, []
        for sequence in waiting:
            sequence.tokens.put(error)
        self._fail_all(error)

    def _drop_cancelled(self) -> None:
        """Remove cancelled sequences; called with the condition held."""
        if not self._cancelled:
            return
        cancelled, self._cancelled = self._cancelled, set()
        self._pending = [s for s in self._pending if s.key not in cancelled]
        for index in reversed(range(len(self._prefilling))):
            if self._prefilling[index].key in cancelled:
                self._remove_prefilling(index)
        for row in reversed(range(len(self._running))):
            if self._running[row].key in cancelled:
                self._remove_row(row)

    def _remove_row(self, row: int) -> None:
        """Remove the running sequence in ``row``: the last running row moves into its place."""
        last = len(self._running) - 1
        if row != last:
            self._cache.move_row(last, row, self._running[last].length)
            self._running[row] = self._running[last]
        self._running.pop()
        # The prompts part-way in now start one row lower: the last of them moves into the
        # freed row and becomes the first.
        if self._prefilling:
            moved = self._prefilling.pop()
            self._cache.move_row(last + 1 + len(self._prefilling), last, moved.length)
            self._prefilling.insert(0, moved)

    def _remove_prefilling(self, index: int) -> None:
        """Remove the sequence whose prompt is part-way in at ``index``: the last one moves into its row."""
        first_row = len(self._running)
        last = len(self._prefilling) - 1
        if index != last:
            self._cache.move_row(first_row + last, first_row + index, self._prefilling[last].length)
            self._prefilling[index] = self._prefilling[last]
        self._prefilling.pop()

    def _fail_prefilling(self, index: int, error: BaseException) -> None:
        sequence = self._prefilling[index]
        with self._condition:
            self._remove_prefilling(index)
        sequence.tokens.put(error)

    def _fail_all(self, error: BaseException) -> None:
        failed = [*self._running, *self._prefilling]
        with self._condition:
            self._running, self._prefilling = [], []
        for sequence in failed:
            sequence.tokens.put(error)

    def _next_prefill(self) -> int:
        """Return the index of the prompt to advance: the one with the fewest tokens left on
        every other call, the oldest otherwise, so a long prompt still progresses."""
        self._iterations += 1
        if self._iterations % 2:
            return min(range(len(self._prefilling)), key=lambda i: len(self._prefilling[i].prompt) - self._prefilling[i].length)
        return min(range(len(self._prefilling)), key=lambda i: self._prefilling[i].key)

    def _prefill_chunk(self, index: int) -> None:
        """Run the next chunk of the prompt at ``index``; a complete prompt joins the running rows."""
        sequence = self._prefilling[index]
        first_row = len(self._running)
        row = first_row + index
        start = sequence.length
        size = BUSY_PREFILL_CHUNK if self._running else PREFILL_CHUNK
        chunk = sequence.prompt[start : start + size]
        end = start + len(chunk)
        # The whole prompt at once, so a long one does not regrow the cache at every chunk.
        self._reserve(first_row + len(self._prefilling), len(sequence.prompt) + 1)
        ids = np.asarray([chunk], dtype=np.int64)
        mask = np.ones((1, end), dtype=np.int64)
        started = time.perf_counter()
        logits = self._run_model(ids, mask, row, row + 1)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += len(chunk)
        self.stats.prefill_s += time.perf_counter() - started
        sequence.length = end
        if end < len(sequence.prompt):
            return
        with self._condition:
            if index:
                # Running rows must stay contiguous: the complete prompt takes the first row after them.
                first = self._prefilling[0]
                self._cache.swap_rows(row, first_row, sequence.length, first.length)
                self._prefilling[0], self._prefilling[index] = sequence, first
            self._running.append(self._prefilling.pop(0))
        self._emit(first_row, logits[0, -1])

    def _decode(self) -> None:
        rows = len(self._running)
        lengths = np.fromiter((s.length for s in self._running), dtype=np.int64, count=rows)
        total = int(lengths.max()) + 1
        self._reserve(rows, total)
        ids = np.fromiter((s.last_token for s in self._running), dtype=np.int64, count=rows).reshape(rows, 1)
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        started = time.perf_counter()
        logits = self._run_model(ids, mask, 0, rows)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += rows
        self.stats.decode_s += time.perf_counter() - started
        for sequence in self._running:
            sequence.length += 1
        # Backwards, so removing a finished row moves only rows already handled.
        for row in reversed(range(rows)):
            self._emit(row, logits[row, -1])

    def _emit(self, row: int, logits: np.ndarray) -> None:
        """Sample the next token of the sequence in ``row``, hand it out, and remove the sequence when it is done."""
        sequence = self._running[row]
        try:
            token, logprob = sequence.sampler.step(logits)
        except Exception as error:  # a sampler failure (a grammar with no valid token) ends only its sequence
            logger.warning("sampling for sequence %d failed: %s", sequence.key, error)
            sequence.tokens.put(error)
            with self._condition:
                self._remove_row(row)
            return
        sequence.generated += 1
        sequence.last_token = token
        finish = None
        if token in sequence.stop_ids:
            finish = "stop"
        elif sequence.generated >= sequence.budget:
            finish = "length"
        sequence.tokens.put(GenerationStep(token, logprob, finish))
        if finish is not None:
            with self._condition:
                self._remove_row(row)

    def _trim_cache(self) -> None:
        """Give back cache memory that the sequences in flight no longer need."""
        if self._cache.nbytes <= IDLE_CACHE_BYTES:
            return
        sequences = [*self._running, *self._prefilling]
        if not sequences:
            self._cache.release()
            self._bindings.clear()
            return
        # A prompt part-way in keeps the room reserved for all of it.
        needed = max([s.length + 1 for s in self._running] + [len(s.prompt) + 1 for s in self._prefilling])
        if self._cache.shrink(len(sequences), needed, self._context_length):
            self.stats.cache_moves += 1
            self._bindings.clear()

    def _reserve(self, rows: int, positions: int) -> None:
        if self._cache.reserve(rows, positions, self._context_length):
            self.stats.cache_moves += 1
            self._bindings.clear()

    def _run_model(self, ids: np.ndarray, mask: np.ndarray, first_row: int, end_row: int) -> np.ndarray:
        """Run ``ids`` for cache rows ``first_row:end_row``; return the logits, ``(rows, tokens, vocab)``."""
        decoder = self._decoder
        binding = self._binding(first_row, end_row)
        binding.bind_cpu_input("input_ids", ids.astype(decoder.ids_dtype, copy=False))
        if decoder.mask_dtype is not None:
            binding.bind_cpu_input("attention_mask", mask.astype(decoder.mask_dtype, copy=False))
        if "position_ids" in decoder.input_names:
            positions = mask.sum(axis=1, keepdims=True) - ids.shape[1] + np.arange(ids.shape[1])[None, :]
            binding.bind_cpu_input("position_ids", positions.astype(np.int64))
        with self._step_lock:
            decoder.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _binding(self, first_row: int, end_row: int) -> Any:
        """Return a fresh IO binding whose cache inputs and outputs are the same rows of the shared buffers."""
        import onnxruntime as ort

        key = (first_row, end_row)
        values = self._bindings.get(key)
        if values is None:
            # A view of whole leading rows is contiguous, so ONNX Runtime reads and writes the
            # shared buffer itself rather than a copy.
            values = {
                name: ort.OrtValue.ortvalue_from_numpy(self._cache.arrays[name][first_row:end_row])
                for name in self._decoder.past_names
            }
            self._bindings[key] = values
        decoder = self._decoder
        # A new binding each call: a reused one keeps the previous call's logits shape.
        binding = decoder.session.io_binding()
        binding.bind_output("logits")  # first, so it is get_outputs()[0]
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(decoder.present_for_past[name], value)
        return binding
