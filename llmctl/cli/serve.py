"""``llmctl serve``: an OpenAI-compatible HTTP server over one or more models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import ProfileOpt
from llmctl.cli.output import stderr


def serve_command(
    models: Annotated[
        list[Path],
        typer.Argument(help="Artifact folders (or Hugging Face folders for --backend torch) to serve."),
    ],
    profile: ProfileOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind; default from the profile (127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="TCP port; 0 picks a free one; default from the profile (8000).")
    ] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", "-b", help="Runtime backend: auto, genai, ort or torch; default from the profile.")
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option("--served-model-name", help="Name clients pass as 'model'; repeat once per MODEL. Default: the folder name."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LLMCTL_API_KEY", show_default=False, help="Require 'Authorization: Bearer KEY' on every endpoint but /health."),
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", min=1, help="Sequences generating at once (each prompt and each of n choices counts); default from the profile.")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option("--max-queue", min=0, help="Requests waiting for a slot before 429; default from the profile.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=0, help="Intra-op threads per model, at most the CPU count; 0 lets the runtime choose; default from the profile."),
    ] = None,
    default_max_tokens: Annotated[
        int | None,
        typer.Option(
            "--default-max-tokens",
            min=0,
            help="Tokens a chat completion may generate when the request sets no max_tokens; "
            "0 fills the rest of the context (OpenAI's behaviour); default from the profile (256).",
        ),
    ] = None,
) -> None:
    """Serve models over the OpenAI HTTP API until SIGINT or SIGTERM.

    Each request is logged on stderr (method, path, status, duration, request id).

    Exit codes:

    0: a signal stopped the server.

    1: a model failed to load, or the port is in use.

    2: a usage mistake: a missing model folder, a bad --host, --threads above the CPU count, or a profile this machine cannot run.
    """
    from llmctl.errors import UsageError
    from llmctl.profiles import load_profile
    from llmctl.serve.models import ModelSpec
    from llmctl.serve.server import serve
    from llmctl.serve.settings import ServeSettings

    names = list(served_model_name or [])
    if names and len(names) != len(models):
        raise UsageError(
            f"{len(names)} --served-model-name values for {len(models)} models",
            hint="give one --served-model-name per MODEL, in the same order, or none",
        )
    loaded_profile = load_profile(profile)
    defaults = loaded_profile.serve
    specs = [
        ModelSpec(
            source=path,
            name=names[i] if names else None,
            backend=backend or defaults.backend,
            threads=threads,
            profile=loaded_profile,
        )
        for i, path in enumerate(models)
    ]
    token_cap = defaults.default_max_tokens if default_max_tokens is None else default_max_tokens
    settings = ServeSettings(
        api_key=api_key or None,
        max_concurrency=max_concurrency or defaults.max_concurrency,
        max_queue=defaults.max_queue if max_queue is None else max_queue,
        max_body_bytes=defaults.max_body_bytes,
        default_max_tokens=token_cap or None,
    )

    # A server logs its requests and model loads by default, as uvicorn and vLLM do.
    serve_logger = logging.getLogger("llmctl.serve")
    if serve_logger.getEffectiveLevel() > logging.INFO:
        serve_logger.setLevel(logging.INFO)

    def announce(url: str) -> None:
        stderr.print(f"serving {', '.join(spec.served_name() for spec in specs)} on {url} (Ctrl+C to stop)", highlight=False)

    serve(specs, settings, host=host or defaults.host, port=defaults.port if port is None else port, on_started=announce)
    stderr.print("server stopped")
