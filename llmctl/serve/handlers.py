"""Request handlers of the OpenAI API: they take a validated request and return a response.

Handlers know nothing about HTTP beyond the request they are given. A streaming request
returns an ``EventStream`` of server-sent-event lines; everything else returns a wire model.
Errors are raised as ``APIError`` and turned into the OpenAI error shape by the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from llmctl.errors import InputError, UsageError
from llmctl.runtime.base import Backend, GenerationStep, SamplingParams, TokenLogprob
from llmctl.runtime.constraints import schema_for
from llmctl.runtime.detokenize import IncrementalDetokenizer
from llmctl.serve import protocol as wire
from llmctl.serve.errors import APIError, bad_request, internal_error, shutting_down
from llmctl.serve.metrics import ServerMetrics
from llmctl.serve.models import ModelPool, ServedModel, TokenTexts
from llmctl.serve.scheduler import Scheduler, SequenceEvent, SequenceGroup, SequenceRequest, Slot

logger = logging.getLogger(__name__)
T = TypeVar("T")

DONE = "data: [DONE]\n\n"
# OpenAI's default for /v1/completions when max_tokens is not given.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def sse(data: wire.Response | dict[str, Any]) -> str:
    """Format one server-sent event carrying ``data`` as JSON."""
    body = data.model_dump_json() if isinstance(data, wire.Response) else json.dumps(data)
    return f"data: {body}\n\n"


@dataclass
class ServerContext:
    """The state every handler shares: the models, the scheduler, the metrics and a thread pool."""

    pool: ModelPool
    scheduler: Scheduler
    metrics: ServerMetrics
    executor: ThreadPoolExecutor
    # max_tokens of a chat request that sets no limit; None fills the rest of the context.
    default_max_tokens: int | None = None
    generations: set[Generation] = field(default_factory=set)
    shutting_down: bool = False

    def shut_down(self) -> None:
        """End every running generation with a 503 error event, and reject new ones.

        Called from a signal handler, so it only sets flags and events.
        """
        self.shutting_down = True
        for generation in list(self.generations):
            generation.group.cancel(shutting_down())

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking backend call (tokenize, template, score) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(function, *args, **kwargs))


class EventStream:
    """A stream of server-sent-event lines that owns cleanup work.

    ``aclose()`` runs the cleanup even when the stream was never iterated (the client went
    away before the first byte), so a held slot is never leaked.
    """

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        self._body = body
        self._cleanup = cleanup
        self._closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            async for line in self._body:
                yield line
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with suppress(RuntimeError):  # "aclose(): asynchronous generator is already running"
                await self._body.aclose()  # type: ignore[attr-defined]
        finally:
            self._cleanup()


async def guard_stream(lines: AsyncIterator[str], request_id: str) -> AsyncIterator[str]:
    """Pass ``lines`` through; an error mid-stream becomes an error event followed by ``[DONE]``."""
    try:
        async for line in lines:
            yield line
    except APIError as error:
        yield sse(error.body())
        yield DONE
    except UsageError as error:
        yield sse(bad_request(str(error)).body())
        yield DONE
    except Exception:
        logger.exception("request %s failed while streaming", request_id)
        yield sse(internal_error(request_id).body())
        yield DONE


# ---------------------------------------------------------------- shared steps


def check_capabilities(model: ServedModel, request: wire.SamplingFields, *, logprobs: bool, prompt_logprobs: bool) -> None:
    """Reject parameters the model's backend cannot honour, with a 400 that names them."""
    backend = model.backend
    capabilities = backend.capabilities
    where = f"the {backend.name} backend serving {model.name!r}"
    if logprobs and not capabilities.logprobs:
        raise bad_request(f"logprobs are not supported by {where}; send the request without logprobs", param="logprobs")
    if prompt_logprobs and not capabilities.prompt_logprobs:
        raise bad_request(f"echo with logprobs is not supported by {where}", param="echo")
    if request.logit_bias and not capabilities.logit_bias:
        raise bad_request(f"logit_bias is not supported by {where}", param="logit_bias")
    penalties = (request.presence_penalty or 0) != 0 or (request.frequency_penalty or 0) != 0
    if penalties and not capabilities.penalties:
        raise bad_request(f"presence_penalty and frequency_penalty are not supported by {where}", param="presence_penalty")
    schema = requested_schema(request)
    if schema is None:
        return
    if not capabilities.json_schema:
        raise bad_request(
            f"response_format {request.response_format.type!r} needs constrained decoding, which {where} does not provide; "
            "send the request without response_format and ask for JSON in the prompt instead",
            param="response_format",
            code="unsupported_response_format",
        )
    if request.ignore_eos:
        raise bad_request(
            "ignore_eos cannot be combined with response_format: the output ends when the JSON value is complete",
            param="ignore_eos",
        )
    if request.stop:
        raise bad_request(
            "stop cannot be combined with response_format: a stop string would cut the JSON value short",
            param="stop",
        )
    try:
        backend.check_json_schema(schema)
    except InputError as error:
        raise bad_request(str(error), param="response_format") from error


def requested_schema(request: wire.SamplingFields) -> dict | None:
    """Return the JSON schema that the request's ``response_format`` requests, or None for free text."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    inner = response_format.json_schema
    try:
        return schema_for(response_format.type, inner.schema_ if inner is not None else None)
    except InputError as error:
        raise bad_request(str(error), param="response_format") from error


def resolve_max_tokens(
    prompt_tokens: int, requested: int | None, context_length: int, *, default: int | None, param: str
) -> int:
    """Return the number of tokens to generate, or raise 400 when the context cannot hold them.

    Args:
        prompt_tokens: tokens in the prompt.
        requested: the request's limit, or None.
        context_length: the model's maximum sequence length.
        default: the limit when none is requested; None fills the rest of the context.
        param: the request field named in the error.
    """
    if requested is not None:
        if prompt_tokens + requested > context_length:
            raise bad_request(
                f"This model's maximum context length is {context_length} tokens, but the request needs "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt plus {requested} for the "
                f"completion); shorten the prompt or lower {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return requested
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens, but the prompt alone has "
            f"{prompt_tokens} tokens; shorten the prompt.",
            param="messages" if param == "max_completion_tokens" else "prompt",
            code="context_length_exceeded",
        )
    return room if default is None else min(default, room)


def sampling_params(request: wire.SamplingFields, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """Translate the request's fields into the backend's parameters for choice number ``choice``."""
    top_k = request.top_k or 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(top_k, 0),
        # Each of n choices needs its own stream of random numbers, or all n would be equal.
        seed=None if request.seed is None else request.seed + choice,
        stop=list(request.stop or []),
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
        json_schema=requested_schema(request),
    )


async def acquire_slots(scheduler: Scheduler, sequences: int, shape: str, *, param: str) -> Slot:
    """Take one scheduler slot per sequence, or raise 400 when the request alone needs more than exist.

    Args:
        scheduler: the server's scheduler.
        sequences: the sequences the request generates.
        shape: how the request makes that many, for the message (``"3 prompts x n=4"``).
        param: the request field named in the error.
    """
    if sequences > scheduler.max_concurrency:
        raise bad_request(
            f"this request generates {sequences} sequences ({shape}) but the server runs at most "
            f"{scheduler.max_concurrency} at once (--max-concurrency); split it into smaller requests",
            param=param,
        )
    return await scheduler.acquire(sequences)


def check_token_ids(model: ServedModel, token_ids: Sequence[int], param: str) -> None:
    """Reject token ids outside the model's vocabulary (prompt ids, logit_bias keys)."""
    vocab_size = getattr(model.backend, "vocab_size", None)
    if not isinstance(vocab_size, int):
        return
    bad = [token for token in token_ids if token < 0 or token >= vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary of {model.name!r} (size {vocab_size})", param=param)


@dataclass
class Collected:
    """Everything one choice produced, for a non-streamed response."""

    text: list[str] = field(default_factory=list)
    steps: list[GenerationStep] = field(default_factory=list)
    finish_reason: str | None = None


def raise_event_error(event: SequenceEvent) -> None:
    if event.error is None:
        return
    if isinstance(event.error, APIError):
        raise event.error
    if isinstance(event.error, UsageError):
        raise bad_request(str(event.error)) from event.error
    raise event.error


class Generation:
    """A batch of sequences holding one scheduler slot, started by a handler.

    Args:
        context: the shared server context.
        model: the model to run.
        sequences: what to generate, one entry per choice.
        slot: the held slot; it is released once no thread uses the backend any more.
    """

    def __init__(self, context: ServerContext, model: ServedModel, sequences: list[SequenceRequest], slot: Slot) -> None:
        self.group = SequenceGroup(
            model.backend, sequences, model_name=model.name, metrics=context.metrics, on_closed=slot.release
        )
        self.started = time.perf_counter()
        self.context = context
        self.model = model
        context.generations.add(self)
        if context.shutting_down:
            self.group.cancel(shutting_down())

    @property
    def completion_tokens(self) -> int:
        return sum(self.group.completion_tokens)

    async def collect(self) -> dict[int, Collected]:
        """Run every sequence to its end and return what each produced, by choice index."""
        results = {sequence.index: Collected() for sequence in self.group.sequences}
        try:
            async for event in self.group.events():
                raise_event_error(event)
                result = results[event.index]
                result.text.append(event.text)
                result.steps.extend(event.steps)
                result.finish_reason = event.finish_reason or result.finish_reason
        finally:
            self.close()
        return results

    def close(self) -> None:
        self.context.generations.discard(self)
        self.group.close()
        self.context.metrics.request_duration.labels(self.model.name).observe(time.perf_counter() - self.started)


# ---------------------------------------------------------------- logprob shapes


def chat_logprobs(steps: Sequence[GenerationStep], texts: TokenTexts, top: int) -> wire.ChatLogprobs:
    """Build the chat ``logprobs.content`` list for generated tokens."""
    content = []
    for step in steps:
        if texts.is_final_eos(step):
            continue
        entry = step.logprob or TokenLogprob(step.token_id, 0.0)
        token = texts(step.token_id)
        alternatives = [
            wire.TopLogprob(token=texts(token_id), logprob=logprob, bytes=texts.bytes_of(token_id))
            for token_id, logprob in entry.top[:top]
        ]
        content.append(
            wire.ChatTokenLogprob(
                token=token, logprob=entry.logprob, bytes=texts.bytes_of(step.token_id), top_logprobs=alternatives
            )
        )
    return wire.ChatLogprobs(content=content)


class TextOffsets:
    """Character offsets of a choice's tokens in the text it returns (the echoed prompt, then
    the completion), for the legacy ``text_offset`` list.

    The tokens are decoded incrementally, so a special token that the text leaves out (BOS,
    EOS) takes no room, and a leading space or a character split across tokens is counted
    where the text has it.

    Args:
        backend: the model, for its decoder.
        context_ids: the prompt when it is not echoed, which gives the first token its context.
    """

    def __init__(self, backend: Backend, context_ids: Sequence[int] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(backend.decode, context_ids)
        self._offset = 0

    def next(self, token_id: int) -> int:
        """Return the offset of ``token_id``, the next token of the text."""
        offset = self._offset
        self._offset += len(self._detokenizer.add(token_id))
        return offset


def append_legacy_logprobs(
    target: wire.CompletionLogprobs,
    entries: Sequence[tuple[int, TokenLogprob | None]],
    texts: TokenTexts,
    top: int,
    offsets: TextOffsets,
) -> None:
    """Append tokens to the legacy ``logprobs`` object of ``/v1/completions``.

    ``top_logprobs`` at each position contains the ``top`` most likely tokens plus the token
    itself, so a client can compare the token with the most likely one at every position
    (lm-eval's ``is_greedy``). An entry without a log-probability (the first prompt token)
    gets None in both lists.
    """
    for token_id, entry in entries:
        target.tokens.append(texts(token_id))
        target.text_offset.append(offsets.next(token_id))
        if entry is None:
            target.token_logprobs.append(None)
            target.top_logprobs.append(None)
            continue
        target.token_logprobs.append(entry.logprob)
        alternatives: dict[str, float] = {}
        for token_id_alt, logprob in [*entry.top[:top], (token_id, entry.logprob)]:
            text = texts(token_id_alt)
            alternatives[text] = max(logprob, alternatives.get(text, float("-inf")))
        target.top_logprobs.append(alternatives)


def generated_entries(steps: Sequence[GenerationStep], texts: TokenTexts) -> list[tuple[int, TokenLogprob | None]]:
    return [(step.token_id, step.logprob or TokenLogprob(step.token_id, 0.0)) for step in steps if not texts.is_final_eos(step)]


# ---------------------------------------------------------------- endpoints


class ModelsHandler:
    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def list(self) -> wire.ModelList:
        """List the served models (empty while they load)."""
        cards = [
            wire.ModelCard(
                id=model.name, created=model.created, max_model_len=model.backend.context_length, backend=model.backend.name
            )
            for model in self.context.pool.models.values()
        ]
        return wire.ModelList(data=cards)


class TokenizeHandler:
    def __init__(self, context: ServerContext) -> None:
        self.context = context

    async def tokenize(self, request: wire.TokenizeRequest) -> wire.TokenizeResponse:
        """Tokenize a prompt, or chat messages through the chat template."""
        model = self.context.pool.get(request.model)
        backend = model.backend
        try:
            if request.messages is not None:
                messages = [{"role": m.role, "content": m.text()} for m in request.messages]
                tokens = await self.context.run(
                    backend.apply_chat_template, messages, add_generation_prompt=request.add_generation_prompt
                )
            else:
                tokens = await self.context.run(backend.encode, request.prompt or "", add_special_tokens=request.add_special_tokens)
        except UsageError as error:
            raise bad_request(str(error), param="messages") from error
        return wire.TokenizeResponse(count=len(tokens), max_model_len=backend.context_length, tokens=list(tokens))

    async def detokenize(self, request: wire.DetokenizeRequest) -> wire.DetokenizeResponse:
        """Turn token ids back into text."""
        model = self.context.pool.get(request.model)
        check_token_ids(model, request.tokens, "tokens")
        try:
            text = await self.context.run(model.backend.decode, request.tokens)
        except (ValueError, TypeError, OverflowError, IndexError) as error:
            raise bad_request(f"cannot decode the token ids: {error}", param="tokens") from error
        return wire.DetokenizeResponse(prompt=text)


class ChatHandler:
    """``POST /v1/chat/completions``."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    async def create(self, request: wire.ChatCompletionRequest, request_id: str) -> wire.ChatCompletion | EventStream:
        """Generate a chat completion, whole or as a stream.

        Raises:
            APIError: 400 for a parameter the model cannot honour or a prompt too long, 404
                for an unknown model, 429 when the queue is full.
        """
        model = self.context.pool.get(request.model)
        check_capabilities(model, request, logprobs=request.logprobs, prompt_logprobs=False)
        check_token_ids(model, [int(t) for t in request.logit_bias or {}], "logit_bias")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            prompt_ids = await self.context.run(
                model.backend.apply_chat_template, messages, add_generation_prompt=request.add_generation_prompt
            )
        except UsageError as error:
            raise bad_request(str(error), param="messages") from error

        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = resolve_max_tokens(
            len(prompt_ids), request.token_limit(), model.backend.context_length,
            default=self.context.default_max_tokens, param=param,
        )
        top = request.top_logprobs or 0
        logprobs = top if request.logprobs else None
        sequences = [
            SequenceRequest(i, list(prompt_ids), sampling_params(request, max_tokens, logprobs, i)) for i in range(request.n)
        ]
        self.context.metrics.prompt_tokens.labels(model.name).inc(len(prompt_ids))

        slot = await acquire_slots(self.context.scheduler, len(sequences), f"n={request.n}", param="n")
        generation = Generation(self.context, model, sequences, slot)
        response_id = wire.new_id("chatcmpl")
        if request.stream:
            body = self._stream(request, generation, len(prompt_ids), response_id, request_id)
            return EventStream(guard_stream(body, request_id), generation.close)

        results = await generation.collect()
        texts = model.token_texts
        choices = [
            wire.ChatChoice(
                index=index,
                message=wire.AssistantMessage(content="".join(result.text)),
                logprobs=chat_logprobs(result.steps, texts, top) if request.logprobs else None,
                finish_reason=result.finish_reason,  # type: ignore[arg-type]
            )
            for index, result in sorted(results.items())
        ]
        usage = wire.Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=generation.completion_tokens,
            total_tokens=len(prompt_ids) + generation.completion_tokens,
        )
        return wire.ChatCompletion(id=response_id, created=wire.now(), model=model.name, choices=choices, usage=usage)

    async def _stream(
        self,
        request: wire.ChatCompletionRequest,
        generation: Generation,
        prompt_tokens: int,
        response_id: str,
        request_id: str,
    ) -> AsyncIterator[str]:
        created = wire.now()
        model_name = generation.model.name
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        texts = generation.model.token_texts
        top = request.top_logprobs or 0

        def chunk(choices: list[wire.ChatChunkChoice], usage: wire.Usage | None = None) -> str:
            return sse(wire.ChatCompletionChunk(id=response_id, created=created, model=model_name, choices=choices, usage=usage))

        for index in range(request.n):
            yield chunk([wire.ChatChunkChoice(index=index, delta=wire.ChatDelta(role="assistant", content=""))])

        async for event in generation.group.events():
            raise_event_error(event)
            if not event.text and event.finish_reason is None and not (request.logprobs and event.steps):
                continue
            logprobs = chat_logprobs(event.steps, texts, top) if request.logprobs else None
            delta = wire.ChatDelta(content=event.text) if event.text or event.finish_reason is None else wire.ChatDelta()
            choice = wire.ChatChunkChoice(
                index=event.index, delta=delta, logprobs=logprobs, finish_reason=event.finish_reason  # type: ignore[arg-type]
            )
            yield chunk([choice])

        if include_usage:
            completion_tokens = generation.completion_tokens
            usage = wire.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
            )
            yield chunk([], usage)
        yield DONE


class CompletionHandler:
    """``POST /v1/completions``, with ``echo`` and prompt log-probabilities in the legacy shape."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    async def create(self, request: wire.CompletionRequest, request_id: str) -> wire.Completion | EventStream:
        """Complete one prompt or a batch of prompts, whole or as a stream.

        Raises:
            APIError: 400 for a parameter the model cannot honour or a prompt too long, 404
                for an unknown model, 429 when the queue is full.
        """
        model = self.context.pool.get(request.model)
        prompt_logprobs = request.echo and request.logprobs is not None
        check_capabilities(model, request, logprobs=request.logprobs is not None, prompt_logprobs=prompt_logprobs)
        check_token_ids(model, [int(t) for t in request.logit_bias or {}], "logit_bias")
        prompts = await self._tokenize(model, request.prompts())

        sequences = []
        for number, prompt_ids in enumerate(prompts):
            max_tokens = resolve_max_tokens(
                len(prompt_ids), request.max_tokens, model.backend.context_length,
                default=COMPLETIONS_DEFAULT_MAX_TOKENS, param="max_tokens",
            )
            for choice in range(request.n):
                params = sampling_params(request, max_tokens, request.logprobs, choice)
                sequences.append(SequenceRequest(number * request.n + choice, prompt_ids, params))
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.context.metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)

        shape = f"{len(prompts)} prompts x n={request.n}" if len(prompts) > 1 else f"n={request.n}"
        slot = await acquire_slots(self.context.scheduler, len(sequences), shape, param="prompt" if len(prompts) > 1 else "n")
        scored: list[list[TokenLogprob | None]] = []
        if prompt_logprobs:
            try:
                scored = await self.context.run(model.backend.score_batch, prompts, top_logprobs=request.logprobs or 0)
            except BaseException:
                slot.release()
                raise
        generation = Generation(self.context, model, sequences, slot)
        response_id = wire.new_id("cmpl")
        if request.stream:
            body = self._stream(request, model, generation, prompts, scored, response_id)
            return EventStream(guard_stream(body, request_id), generation.close)

        results = await generation.collect()
        texts = model.token_texts
        choices = []
        for index, result in sorted(results.items()):
            number = index // request.n
            text = "".join(result.text)
            logprobs = None
            if request.logprobs is not None:
                logprobs = wire.CompletionLogprobs()
                offsets = TextOffsets(model.backend, () if request.echo else prompts[number])
                if request.echo:
                    entries = self._prompt_entries(prompts[number], scored, number)
                    append_legacy_logprobs(logprobs, entries, texts, request.logprobs, offsets)
                append_legacy_logprobs(logprobs, generated_entries(result.steps, texts), texts, request.logprobs, offsets)
            if request.echo:
                text = await self._echo_text(model, request.prompts()[number], prompts[number]) + text
            choices.append(
                wire.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=result.finish_reason)  # type: ignore[arg-type]
            )
        usage = wire.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=prompt_tokens + generation.completion_tokens,
        )
        return wire.Completion(id=response_id, created=wire.now(), model=model.name, choices=choices, usage=usage)

    async def _tokenize(self, model: ServedModel, prompts: list[str | list[int]]) -> list[list[int]]:
        result = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = await self.context.run(model.backend.encode, prompt, add_special_tokens=True)
            else:
                check_token_ids(model, prompt, "prompt")
                ids = list(prompt)
            if not ids:
                ids = [self._start_token(model.backend)]
            result.append(list(ids))
        return result

    @staticmethod
    def _start_token(backend: Backend) -> int:
        # An empty prompt still needs one token to condition on. OpenAI's models start from
        # their document separator; the closest in the interface is BOS, else the first EOS.
        bos = getattr(backend, "bos_token_id", None)
        if bos is None:
            bos = getattr(getattr(backend, "tokenizer", None), "bos_token_id", None)
        if isinstance(bos, int):
            return bos
        return backend.eos_token_ids[0]

    @staticmethod
    def _prompt_entries(
        prompt_ids: list[int], scored: list[list[TokenLogprob | None]], number: int
    ) -> list[tuple[int, TokenLogprob | None]]:
        entries = scored[number] if scored else [None] * len(prompt_ids)
        return list(zip(prompt_ids, entries, strict=True))

    async def _echo_text(self, model: ServedModel, prompt: str | list[int], prompt_ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return await self.context.run(model.backend.decode, prompt_ids)

    async def _stream(
        self,
        request: wire.CompletionRequest,
        model: ServedModel,
        generation: Generation,
        prompts: list[list[int]],
        scored: list[list[TokenLogprob | None]],
        response_id: str,
    ) -> AsyncIterator[str]:
        created = wire.now()
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        texts = model.token_texts
        top = request.logprobs or 0
        # One per choice, kept across chunks so offsets continue where the last chunk ended.
        offsets: dict[int, TextOffsets] = {}

        def chunk(choices: list[wire.CompletionChoice], usage: wire.Usage | None = None) -> str:
            return sse(wire.Completion(id=response_id, created=created, model=model.name, choices=choices, usage=usage))

        if request.echo:
            for sequence in generation.group.sequences:
                number = sequence.index // request.n
                text = await self._echo_text(model, request.prompts()[number], prompts[number])
                logprobs = None
                if request.logprobs is not None:
                    logprobs = wire.CompletionLogprobs()
                    offsets[sequence.index] = TextOffsets(model.backend)
                    entries = self._prompt_entries(prompts[number], scored, number)
                    append_legacy_logprobs(logprobs, entries, texts, top, offsets[sequence.index])
                yield chunk([wire.CompletionChoice(index=sequence.index, text=text, logprobs=logprobs, finish_reason=None)])

        async for event in generation.group.events():
            raise_event_error(event)
            if not event.text and event.finish_reason is None and not (request.logprobs is not None and event.steps):
                continue
            logprobs = None
            if request.logprobs is not None:
                logprobs = wire.CompletionLogprobs()
                if event.index not in offsets:
                    offsets[event.index] = TextOffsets(model.backend, prompts[event.index // request.n])
                append_legacy_logprobs(logprobs, generated_entries(event.steps, texts), texts, top, offsets[event.index])
            choice = wire.CompletionChoice(
                index=event.index, text=event.text, logprobs=logprobs, finish_reason=event.finish_reason  # type: ignore[arg-type]
            )
            yield chunk([choice])

        if include_usage:
            prompt_tokens = sum(len(ids) for ids in prompts)
            completion_tokens = generation.completion_tokens
            usage = wire.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
            )
            yield chunk([], usage)
        yield DONE
