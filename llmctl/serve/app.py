"""The FastAPI app: thin routes over the handlers, the guard middleware and the error shape."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmctl.errors import LlmctlError, UsageError
from llmctl.serve import protocol as wire
from llmctl.serve.errors import APIError, bad_request, error_bytes, from_validation_errors, internal_error
from llmctl.serve.handlers import ChatHandler, CompletionHandler, EventStream, ModelsHandler, ServerContext, TokenizeHandler
from llmctl.serve.metrics import ServerMetrics
from llmctl.serve.models import ModelPool, ModelSpec
from llmctl.serve.scheduler import Scheduler
from llmctl.serve.settings import ServeSettings

logger = logging.getLogger(__name__)
# One line per request: method, path, status, duration and request id; never bodies or keys.
access_logger = logging.getLogger("llmctl.serve.access")
# Probes that a load balancer sends every few seconds are logged at DEBUG only.
QUIET_PATHS = {"/health", "/metrics"}

OPEN_PATHS = {"/health"}
ENDPOINTS = {
    "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
}
REQUEST_ID_HEADER = "x-request-id"
# How long shutdown waits for a model that is still loading before it leaves it behind.
LOADER_JOIN_TIMEOUT_S = 2.0


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


class GuardMiddleware:
    """Give each request an id, check the API key, cap the body size and count responses.

    It runs before FastAPI parses anything, so a request without a valid key gets 401 and an
    oversized body gets 413 whatever its content.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status: dict[str, Any] = {"code": 500, "started": False}
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            error = self._check_key(path, headers)
            if error is None:
                receive, error = await self._limit_body(headers, receive)
            if error is not None:
                await self._send_error(send_with_id, error)
                return
            await self.app(scope, receive, send_with_id)
        except Exception as failure:
            # Here and not in an exception handler, so the 500 carries the request id header
            # and the failure is logged once, with the request id, and not re-raised to uvicorn.
            logger.error("request %s failed", request_id, exc_info=failure)
            if status["started"]:
                raise
            await self._send_error(send_with_id, internal_error(request_id))
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            access_logger.log(
                logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                "%s %s %s %.0f ms request_id=%s",
                scope["method"], path, status["code"], (time.perf_counter() - started) * 1000, request_id,
            )

    def _check_key(self, path: str, headers: dict[str, str]) -> APIError | None:
        key = self.settings.api_key
        if not key or path in OPEN_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # Constant-time comparison, so response timing does not reveal how much of a key matched.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return None
        return APIError(
            401,
            "Missing or invalid API key; send it as 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
        )

    async def _limit_body(self, headers: dict[str, str], receive: Receive) -> tuple[Receive, APIError | None]:
        """Read the whole body up front (at most the limit) and replay it to the app."""
        limit = self.settings.max_body_bytes
        too_large = APIError(
            413,
            f"The request body is larger than the server's limit of {limit} bytes; send a shorter request.",
            code="request_too_large",
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return receive, too_large

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away while sending; let the app see the disconnect.
                return _replay([], message, receive), None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return _replay(chunks, None, receive), None

    @staticmethod
    async def _send_error(send: Send, error: APIError) -> None:
        body = error_bytes(error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(key.lower().encode(), value.encode()) for key, value in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay


class EventStreamResponse(StreamingResponse):
    """A server-sent-event response that always closes its stream, which releases the slot."""

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client disconnects first; None then.

    A client that gives up while queued or while its completion is generated frees its slot
    at once instead of after the whole completion has been generated. Streams are watched by the
    response itself once they have started.
    """
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            logger.info("request %s cancelled: the client disconnected", request_id_of(request))
            with suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
    if task.cancelled():
        return None
    result = task.result()
    if watcher.done() and isinstance(result, EventStream):
        await result.aclose()  # finished just as the client left, so no one will read the stream
        return None
    return result


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:
            # FastAPI's response to a body it cannot decode (invalid UTF-8, nesting too deep).
            return error_response(
                APIError(400, f"The request body cannot be parsed as JSON in UTF-8: {error.detail}", code="invalid_json")
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))

    @app.exception_handler(LlmctlError)
    async def _llmctl_error(request: Request, error: LlmctlError) -> JSONResponse:
        if isinstance(error, UsageError):
            return error_response(bad_request(str(error)))
        logger.error("request %s failed: %s", request_id_of(request), error)
        return error_response(internal_error(request_id_of(request)))


def create_app(models: Sequence[ModelSpec], settings: ServeSettings, *, on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the server app for ``models``.

    The models load in a background thread once the app starts, so ``GET /health`` returns
    503 while they load and 200 afterwards.

    Args:
        models: what to serve; each request's ``model`` field picks one by its served name.
        settings: admission limits, body limit and API key.
        on_load_failure: called with the error when a model fails to load (the CLI stops the
            server); without it the server keeps answering 503.

    Raises:
        UsageError: no model, or two models served under the same name.
    """
    pool = ModelPool(models)
    metrics = ServerMetrics()
    context = ServerContext(
        pool=pool,
        scheduler=Scheduler(settings.max_concurrency, settings.max_queue, metrics, settings.retry_after_s),
        metrics=metrics,
        executor=ThreadPoolExecutor(max_workers=max(4, settings.max_concurrency), thread_name_prefix="llmctl-serve"),
        default_max_tokens=settings.default_max_tokens,
    )
    state: dict[str, BaseException | None] = {"load_error": None}

    def load_models() -> None:
        try:
            pool.load()
        except BaseException as error:  # noqa: BLE001 - reported through /health and on_load_failure
            state["load_error"] = error
            if on_load_failure is not None:
                logger.debug("loading the models failed", exc_info=error)  # the caller reports it
                on_load_failure(error)
            else:
                logger.error("loading the models failed: %s", error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_models, name="llmctl-load", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(loader.join, LOADER_JOIN_TIMEOUT_S)
        if loader.is_alive():
            # A stop signal during a long load: the loader is a daemon thread and ends with the process.
            logger.warning("stopping while the models are still loading")
        else:
            pool.close()
        context.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llmctl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    install_error_handlers(app)
    app.state.context = context
    add_routes(app, context, state)
    return app


def add_routes(app: FastAPI, context: ServerContext, state: dict[str, BaseException | None]) -> None:
    """Register the thin HTTP routes; each parses, calls one handler and shapes the response."""
    chat = ChatHandler(context)
    completions = CompletionHandler(context)
    tokenizer = TokenizeHandler(context)
    models = ModelsHandler(context)

    def respond(result: wire.Response | EventStream | None) -> Response:
        if result is None:
            # The client disconnected; 499 (nginx's "client closed request") is only logged.
            return Response(status_code=499)
        if isinstance(result, EventStream):
            return EventStreamResponse(result)
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/health")
    async def health() -> Response:
        if state["load_error"] is not None:
            return JSONResponse({"status": "failed", "error": str(state["load_error"])}, status_code=503)
        if not context.pool.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "models": context.pool.names()})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return respond(models.list())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: wire.ChatCompletionRequest, request: Request) -> Response:
        return respond(await cancel_on_disconnect(request, chat.create(body, request_id_of(request))))

    @app.post("/v1/completions")
    async def create_completion(body: wire.CompletionRequest, request: Request) -> Response:
        return respond(await cancel_on_disconnect(request, completions.create(body, request_id_of(request))))

    @app.post("/tokenize")
    async def tokenize(body: wire.TokenizeRequest) -> Response:
        return respond(await tokenizer.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: wire.DetokenizeRequest) -> Response:
        return respond(await tokenizer.detokenize(body))
