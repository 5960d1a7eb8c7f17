"""Settings of one server, filled from the command line and the profile's ``serve`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """How the server admits and limits requests.

    Attributes:
        api_key: the key clients must send as ``Authorization: Bearer KEY``; None leaves the API open.
        max_concurrency: sequences generating at once; each prompt and each of n choices counts.
        max_queue: requests waiting for a slot before new ones get 429.
        max_body_bytes: largest request body accepted; larger ones get 413.
        retry_after_s: ``Retry-After`` seconds sent with 429.
        shutdown_timeout_s: seconds in-flight requests get to finish after SIGINT/SIGTERM
            before they are cancelled.
        default_max_tokens: tokens a chat completion may generate when the request sets
            neither ``max_tokens`` nor ``max_completion_tokens``; None fills the rest of the
            context, as OpenAI does.
    """

    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1_048_576
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0
    default_max_tokens: int | None = None
