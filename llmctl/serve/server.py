"""Run the app under uvicorn: bind, serve, and shut down cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from llmctl.errors import LlmctlError, RuntimeBackendError, UsageError
from llmctl.serve.models import ModelPool, ModelSpec
from llmctl.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus its habit of re-raising the caught signal after shutdown.

        uvicorn (0.29 and later) re-sends SIGINT/SIGTERM to the process once it has shut
        down, which would turn a clean stop into exit status 130 or 143. Here a signal means
        "stop serving", and the process exits 0 afterwards. The first signal also calls
        ``on_exit``, which ends the running generations, so open streams close within a token
        instead of holding the shutdown for ``timeout_graceful_shutdown``.
        """

        on_exit: Callable[[], None] | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and self.on_exit is not None:
                self.on_exit()

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

    The model paths, backends and thread counts are checked and the address is bound before
    anything loads, so those mistakes fail at once. On a signal the server stops accepting
    connections, ends the running generations (a stream gets an error event and ``[DONE]``),
    gives the requests ``settings.shutdown_timeout_s`` seconds to close, releases the models
    and returns.

    Args:
        models: the models to serve.
        settings: admission limits, body limit and API key.
        host: the address to bind; 127.0.0.1 keeps the server local.
        port: the TCP port; 0 picks a free one.
        on_started: called with the base URL once the socket is bound and every model has loaded.

    Raises:
        UsageError: no model, duplicate served names, a model that cannot be opened, or a
            host that is not a local address.
        LlmctlError: a model failed to load (the server stops first).
        RuntimeBackendError: the port is in use or cannot be bound.
    """
    import uvicorn

    from llmctl.serve.app import create_app

    ModelPool(models).check()
    listener = bind_socket(host, port)

    failure: list[BaseException] = []
    server_holder: list[uvicorn.Server] = []

    def stop_on_load_failure(error: BaseException) -> None:
        failure.append(error)
        if server_holder:
            server_holder[0].should_exit = True

    app = create_app(models, settings, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app,
        log_config=None,  # keep llmctl's logging set-up
        access_log=False,  # GuardMiddleware logs each request without its query string
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
    )
    server = _server_class()(config)
    server.on_exit = app.state.context.shut_down
    server_holder.append(server)

    if on_started is not None:
        _call_when_ready(server, app.state.context.pool, listener, on_started)
    with listener:
        server.run(sockets=[listener])

    if failure:
        error = failure[0]
        if isinstance(error, LlmctlError):
            raise error
        raise RuntimeBackendError(f"loading the model failed: {error}") from error


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket on ``host``:``port``.

    Raises:
        UsageError: ``host`` is not a name or address of this machine.
        RuntimeBackendError: the port is in use, or binding failed for another reason.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise UsageError(
            f"--host {host!r} is not a valid address ({getattr(error, 'strerror', None) or error})",
            hint="pass an IP address of this machine, such as 127.0.0.1 or 0.0.0.0",
        ) from None

    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise RuntimeBackendError(
                f"port {port} on {host} is already in use",
                hint="pass another --port, or --port 0 to pick a free one",
            ) from None
        if error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise UsageError(
                f"--host {host!r} is not an address of this machine ({error.strerror})",
                hint="pass an IP address of this machine, such as 127.0.0.1 or 0.0.0.0",
            ) from None
        hint = "pass a --port of 1024 or more" if error.errno == errno.EACCES else "check --host and --port"
        raise RuntimeBackendError(f"cannot listen on {host}:{port}: {error.strerror}", hint=hint) from None
    listener.set_inheritable(True)
    return listener


def _call_when_ready(server: Any, pool: ModelPool, listener: socket.socket, callback: Callable[[str], None]) -> None:
    """Call ``callback`` with the bound URL from a watcher thread once uvicorn serves and the models have loaded."""
    host, port = listener.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def watch() -> None:
        import time

        while not (getattr(server, "started", False) and pool.ready):
            if getattr(server, "should_exit", False):
                return
            time.sleep(0.05)
        callback(url)

    threading.Thread(target=watch, name="llmctl-started", daemon=True).start()
