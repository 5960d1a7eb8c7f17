"""Helpers for the server tests: a real uvicorn server on a free port, and instrumented backends.

The instrumented backends wrap a loaded backend and forward every call to it. Each adds one
behaviour a test needs to provoke (a slow or failing generation, a gated load, a scripted
token stream), so hard cases are reproducible without replacing the model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from llmctl.runtime.base import Backend, GenerationStep, SamplingParams, TokenLogprob
from llmctl.serve.models import ModelSpec
from llmctl.serve.settings import ServeSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A server started in a thread of this process; ``url`` is its base URL."""

    def __init__(self, server: Any, thread: threading.Thread, port: int, app: Any) -> None:
        self.server = server
        self.thread = thread
        self.url = f"http://127.0.0.1:{port}"
        self.app = app

    def client(self, api_key: str = "none", **options: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **options)

    def metric(self, name: str, labels: str = "") -> float:
        """Return one sample of ``GET /metrics``, e.g. ``metric("llmctl_running_requests")``."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": "Bearer none"}).text
        for line in text.splitlines():
            if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_until(self, condition: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False


@contextlib.contextmanager
def running_server(
    models: Sequence[ModelSpec], settings: ServeSettings | None = None, *, wait_ready: bool = True
) -> Iterator[RunningServer]:
    """Start a real uvicorn server on a free port on 127.0.0.1, and stop it on exit."""
    import uvicorn

    from llmctl.serve.app import create_app

    app = create_app(models, settings or ServeSettings())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    running = RunningServer(server, thread, port, app)
    try:
        assert running.wait_until(lambda: server.started), "server did not start"
        if wait_ready:
            assert running.wait_until(lambda: _health(running.url) == 200, timeout=120), "models did not load"
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


class WrappedBackend(Backend):
    """Forward every call to ``inner``, an already loaded backend.

    Args:
        inner: the real backend.
        load_gate: ``load()`` waits for this event (to observe the loading state).
        delay_s: sleep this long before each generated token (to keep a generation running).
        fail_after: raise ``RuntimeError`` after this many generated tokens.
        script: generate the tokens of this text instead of sampling (to test detokenization).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        load_gate: threading.Event | None = None,
        delay_s: float = 0.0,
        fail_after: int | None = None,
        script: str | None = None,
    ) -> None:
        super().__init__(inner.model_path)
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities
        self.load_gate = load_gate
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.script = script
        self.closed_generations = 0
        self.started_generations = 0

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait(timeout=60)

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    @property
    def eos_token_ids(self) -> list[int]:
        return self.inner.eos_token_ids

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.inner, "vocab_size", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.inner, "tokenizer", None)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        return self.inner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def check_json_schema(self, schema: dict) -> None:
        self.inner.check_json_schema(schema)

    def token_bytes(self, token_id: int) -> bytes | None:
        return self.inner.token_bytes(token_id)

    def score(self, token_ids: Sequence[int], *, top_logprobs: int = 0) -> list[TokenLogprob | None]:
        return self.inner.score(token_ids, top_logprobs=top_logprobs)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        self.started_generations += 1
        try:
            if self.script is not None:
                yield from self._replay(params)
                return
            for count, step in enumerate(self.inner.generate(prompt_ids, params), start=1):
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self.fail_after is not None and count > self.fail_after:
                    raise RuntimeError("injected failure: secret internal detail")
                yield step
        finally:
            self.closed_generations += 1

    def _replay(self, params: SamplingParams) -> Iterator[GenerationStep]:
        ids = self.inner.encode(self.script or "", add_special_tokens=False)[: params.max_tokens]
        for position, token_id in enumerate(ids):
            finish = None
            if position == len(ids) - 1:
                finish = "length" if len(ids) == params.max_tokens else "stop"
            yield GenerationStep(token_id=token_id, finish_reason=finish)


@contextlib.contextmanager
def throttled(lock, pause_s: float = 0.005) -> Iterator[None]:
    """Make every model step wait ``pause_s``, as a model larger than the tiny one would.

    A thread takes ``lock`` (a backend's or engine's step lock) in turn with the model calls
    and holds it for ``pause_s``, so a client has time to act before the tiny model finishes.
    """
    stop = threading.Event()

    def throttle() -> None:
        while not stop.is_set():
            with lock:
                time.sleep(pause_s)

    thread = threading.Thread(target=throttle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def slow_steps(backend, pause_s: float = 0.005):
    """Throttle every model step of ``backend`` (see ``throttled``)."""
    return throttled(backend._lock, pause_s)
