"""An OpenAI-compatible server as the eval target, through httpx.

Log-likelihood tasks send ``/v1/completions`` requests with ``echo`` and ``logprobs`` and read
the prompt tokens' log-probabilities back. When a server does not support that, those tasks
are skipped with its error message as the reason, and generation tasks still run. An
unreachable server, or one that responds to a request with an error, stops the run with
``InputError``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from llmctl.errors import InputError, UsageError
from llmctl.eval.target import Advance, RollingScore, SpeedSample, cut_at_stop

logger = logging.getLogger(__name__)

# Status codes with which a server rejects a request whose parameters it does not support.
UNSUPPORTED_STATUSES = {400, 404, 405, 422, 501}


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])[:200]
    return json.dumps(body)[:200]


class ServerError(InputError):
    """A server responded to a request with an error status."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class HttpTarget:
    """A model behind an OpenAI-compatible HTTP API.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: sent as a bearer token when given.
        model: the model name to request; None takes the first model the server lists.
        timeout_s: seconds to wait for each response.

    Raises:
        UsageError: the URL is not http(s).
        InputError: the server cannot be reached, responds to ``GET /models`` with an error,
            or does not list ``model``.
    """

    kind = "url"

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None, timeout_s: float = 300.0) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"invalid --url {base_url!r}", hint="use http://host:port/v1")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers)
        self._loglikelihood_reason: str | None = None
        self._probed = False
        self.model = self._choose_model(model)

    # --- transport --------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        url = f"{self.base_url}{path}"
        try:
            response = self._client.request(method, url, json=payload)
        except httpx.TimeoutException:
            raise InputError(f"{method} {url} timed out", hint="check the server or raise --timeout") from None
        except httpx.HTTPError as error:
            raise InputError(f"cannot reach {url}: {error}", hint="check --url and that the server is running") from None
        if response.status_code >= 400:
            raise ServerError(
                f"{method} {url} failed with HTTP {response.status_code}: {_error_message(response)}",
                status=response.status_code, hint="check the server's log",
            )
        try:
            body = response.json()
        except ValueError:
            raise InputError(f"{method} {url} returned a body that is not JSON", hint="is --url an OpenAI-compatible API?") from None
        if not isinstance(body, dict):
            raise InputError(f"{method} {url} returned {type(body).__name__} instead of a JSON object")
        return body

    def _choose_model(self, requested: str | None) -> str:
        body = self._request("GET", "/models")
        names = [entry.get("id") for entry in body.get("data", []) if isinstance(entry, dict)]
        if requested is not None:
            if names and requested not in names:
                raise InputError(f"the server does not serve model {requested!r}", hint=f"served models: {', '.join(map(str, names))}")
            return requested
        if not names:
            raise InputError(f"{self.base_url}/models lists no model", hint="pass --model NAME")
        return str(names[0])

    # --- log-likelihood ---------------------------------------------------------------

    def _echo_logprobs(self, prompt: str) -> tuple[list[float | None], list[int]]:
        """Return the log-probability and character offset of each prompt token.

        ``max_tokens: 0`` with ``echo`` requests the prompt's log-probabilities alone, as the
        OpenAI completions API defined it.
        """
        body = self._request("POST", "/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 0,
        })
        try:
            logprobs = body["choices"][0]["logprobs"]
            values, offsets = logprobs["token_logprobs"], logprobs["text_offset"]
        except (KeyError, IndexError, TypeError):
            raise InputError("the server's completion has no logprobs.token_logprobs and text_offset", hint="the server must support echo with logprobs") from None
        if not isinstance(values, list) or not isinstance(offsets, list) or len(values) != len(offsets):
            raise InputError("the server returned token_logprobs and text_offset of different lengths")
        return values, offsets

    def loglikelihood_unsupported(self) -> str | None:
        """Probe once whether the server returns prompt log-probabilities; return why not, or None."""
        if not self._probed:
            self._probed = True
            try:
                values, _ = self._echo_logprobs("The quick brown fox jumps over the lazy dog.")
                if len(values) < 2 or values[1] is None:
                    self._loglikelihood_reason = "the server returned no log-probabilities for the prompt tokens"
            except ServerError as error:
                if error.status not in UNSUPPORTED_STATUSES:
                    raise
                self._loglikelihood_reason = f"the server does not support echo with logprobs on /v1/completions: {error.message}"
            if self._loglikelihood_reason:
                logger.warning("%s; log-likelihood tasks are skipped", self._loglikelihood_reason)
        return self._loglikelihood_reason

    def loglikelihoods(self, requests: Sequence[tuple[str, str]], advance: Advance | None = None) -> list[float]:
        """Return the summed log-probability of each continuation given its context.

        The pair is split as lm-evaluation-harness splits it. Trailing spaces of the context
        move to the continuation, and the server tokenizes the joined text once. The
        continuation is every token after as many tokens as the context alone has.
        """
        context_lengths: dict[str, int] = {}
        totals = []
        for context, continuation in requests:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context not in context_lengths:
                context_lengths[context] = len(self._echo_logprobs(context)[0])
            skip = context_lengths[context]
            if skip == 0:
                raise InputError("a multiple-choice context is empty", hint="give every question some context text")
            values, _ = self._echo_logprobs(context + continuation)
            picked = values[skip:]
            if not picked or any(v is None for v in picked):
                raise InputError(f"the server returned no log-probability for the continuation {continuation!r}")
            totals.append(float(sum(picked)))  # type: ignore[arg-type]
            if advance:
                advance(1)
        return totals

    def rolling_logprobs(
        self, text: str, *, context: int, stride: int, max_tokens: int | None, max_windows: int | None,
        begin: Advance | None = None, advance: Advance | None = None,
    ) -> RollingScore:
        """Score the text in pieces of whole lines that fit the context.

        NOTE: without the server's tokenizer, the pieces are cut by characters (two per token
        of ``context``) and do not overlap. Each piece's first token is not scored, so the
        figure is close to, not equal to, a local sliding-window perplexity.
        """
        pieces = _line_pieces(text, max(16, context * 2))
        if max_windows is not None:
            pieces = pieces[:max_windows]
        if begin:
            begin(len(pieces))
        logprobs: list[float] = []
        scored_bytes = 0
        for piece in pieces:
            values, offsets = self._echo_logprobs(piece)
            for value, offset in zip(values[1:], offsets[1:], strict=True):
                if value is None:
                    raise InputError("the server returned a prompt token without a log-probability")
                logprobs.append(float(value))
            if len(offsets) > 1:
                scored_bytes += len(piece[offsets[1]:].encode("utf-8"))
            if max_tokens is not None and len(logprobs) >= max_tokens:
                logprobs = logprobs[:max_tokens]
                break
            if advance:
                advance(1)
        return RollingScore(logprobs, scored_bytes, len(pieces), {"method": "http-pieces", "piece_chars": max(16, context * 2)})

    # --- generation -------------------------------------------------------------------

    def generate_text(
        self, prompt: str | None, messages: list[dict[str, str]] | None, *, chat: bool, max_tokens: int,
        stop: list[str], seed: int,
    ) -> str:
        """Generate greedily through ``/chat/completions`` (messages) or ``/completions`` (prompt)."""
        common: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "seed": seed}
        if stop:
            common["stop"] = stop[:4]  # the OpenAI API accepts at most four stop strings
        if messages is not None or chat:
            chat_messages = messages if messages is not None else [{"role": "user", "content": prompt or ""}]
            body = self._request("POST", "/chat/completions", {**common, "messages": chat_messages})
            text = _first_choice(body).get("message", {}).get("content") or ""
        else:
            body = self._request("POST", "/completions", {**common, "prompt": prompt or ""})
            text = _first_choice(body).get("text") or ""
        return cut_at_stop(str(text), stop)

    # --- speed ------------------------------------------------------------------------

    def measure_speed(self, text: str, prompt_tokens: int, output_tokens: int, repeats: int, advance: Advance | None = None) -> tuple[list[SpeedSample], float | None]:
        """Time streamed completions; the token counts come from the streamed chunks or the usage block.

        Returns:
            The timed samples, and None for memory: a client cannot see the server's memory.
        """
        words = text.split()
        word_count = max(1, prompt_tokens * 3 // 4)  # estimate: about 4/3 tokens per English word
        prompt = " ".join((words * (word_count // max(1, len(words)) + 1))[:word_count])
        samples = []
        for run in range(repeats + 1):
            sample = self._timed_stream(prompt, output_tokens)
            if run > 0 and sample is not None:
                samples.append(sample)
                if advance:
                    advance(1)
        return samples, None

    def _timed_stream(self, prompt: str, output_tokens: int) -> SpeedSample | None:
        import httpx

        url = f"{self.base_url}/completions"
        payload = {"model": self.model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
                   "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first = last = None
        chunks, usage = 0, None
        try:
            with self._client.stream("POST", url, json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServerError(f"POST {url} failed with HTTP {response.status_code}: {_error_message(response)}",
                                      status=response.status_code, hint="check the server's log")
                for line in response.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        usage = event["usage"]
                    if event.get("choices") and event["choices"][0].get("text"):
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
        except httpx.HTTPError as error:
            raise InputError(f"cannot reach {url}: {error}", hint="check --url and that the server is running") from None
        if first is None or last is None:
            return None
        completion = int(usage["completion_tokens"]) if usage else chunks
        prompt_count = int(usage["prompt_tokens"]) if usage else len(prompt.split())
        return SpeedSample(prompt_count, completion, first - started, last - first)

    def close(self) -> None:
        self._client.close()


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise InputError("the server's response has no choices")
    return choices[0]


def _line_pieces(text: str, max_chars: int) -> list[str]:
    """Group whole lines into pieces of at most ``max_chars`` characters (a longer line is cut)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars and current:
            pieces.append(current)
            current = ""
        current += line
    if current.strip():
        pieces.append(current)
    return [piece for piece in pieces if piece.strip()]
