"""Run the app under uvicorn: bind, serve, and shut down cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Generator, Sequence

from llmctl.errors import LlmctlError, RuntimeBackendError
from llmctl.serve.models import ModelSpec
from llmctl.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus its habit of re-raising the caught signal after shutdown.

        uvicorn (0.29 and later) re-sends SIGINT/SIGTERM to the process once it has shut
        down, which would turn a clean stop into exit status 130 or 143. Here a signal means
        "stop serving", and the process exits 0 afterwards.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def serve(
    models: Sequence[ModelSpec],
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve ``models`` over HTTP until SIGINT or SIGTERM.

    On a signal the server stops accepting connections, gives in-flight requests
    ``settings.shutdown_timeout_s`` seconds to finish, cancels the rest, releases the
    models and returns.

    Args:
        models: the models to serve.
        settings: admission limits, body limit and API key.
        host: the address to bind; 127.0.0.1 keeps the server local.
        port: the TCP port; 0 picks a free one.
        on_started: called with the base URL once the socket is bound.

    Raises:
        UsageError: no model, or duplicate served names.
        LlmctlError: a model failed to load (the server stops first).
        RuntimeBackendError: the address could not be bound.
    """
    import uvicorn

    from llmctl.serve.app import create_app

    failure: list[BaseException] = []
    server_holder: list[uvicorn.Server] = []

    def stop_on_load_failure(error: BaseException) -> None:
        failure.append(error)
        if server_holder:
            server_holder[0].should_exit = True

    app = create_app(models, settings, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep llmctl's logging set-up
        access_log=False,  # request lines could carry prompts in query strings of other tools
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
    )
    server = _server_class()(config)
    server_holder.append(server)

    if on_started is not None:
        _call_when_started(server, on_started)
    server.run()

    if failure:
        error = failure[0]
        if isinstance(error, LlmctlError):
            raise error
        raise RuntimeBackendError(f"loading the model failed: {error}") from error
    if not server.started:
        raise RuntimeBackendError(
            f"cannot listen on {host}:{port}", hint="the port may be in use; choose another with --port"
        )


def _call_when_started(server: object, callback: Callable[[str], None]) -> None:
    """Call ``callback`` with the bound URL from a watcher thread once uvicorn has started."""

    def watch() -> None:
        import time

        while not getattr(server, "started", False):
            if getattr(server, "should_exit", False):
                return
            time.sleep(0.05)
        sockets = [sock for listener in getattr(server, "servers", []) for sock in listener.sockets]
        if sockets:
            host, port = sockets[0].getsockname()[:2]
            callback(f"http://{host}:{port}")

    threading.Thread(target=watch, name="llmctl-started", daemon=True).start()
