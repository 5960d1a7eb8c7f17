"""The one place where library exceptions become a one-line message and an exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup

from llmctl.errors import LlmctlError

ENV_DEBUG = "LLMCTL_DEBUG"


def report(error: LlmctlError) -> None:
    """Print ``error`` on stderr as ``error: message`` plus its hint."""
    from llmctl.cli.output import stderr

    lines = error.message.splitlines() or [error.message]
    stderr.print(f"[bold red]error:[/] {lines[0]}", highlight=False, markup=True, soft_wrap=True)
    for line in lines[1:]:
        stderr.print(f"  {line}", highlight=False, markup=False)
    if error.hint:
        stderr.print(f"  hint: {error.hint}", highlight=False, markup=False)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM.

    It is a KeyboardInterrupt so that every cleanup written for Ctrl-C (``atomic_output``
    removing its staging folder, locks being released) runs for ``kill``, ``timeout``, CI
    cancellation and ``docker stop`` too.
    """


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while the block runs, then restore the old handler."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can be set only in the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LlmctlGroup(TyperGroup):
    """A command group that reports llmctl errors as one line instead of a traceback.

    Exceptions that are not ``LlmctlError`` keep their traceback: they are bugs. Setting
    ``LLMCTL_DEBUG=1`` prints the traceback of every llmctl error too, and keeps its exit code.
    SIGINT exits with 130 and SIGTERM with 143, after the same cleanup.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except LlmctlError as error:
            if os.environ.get(ENV_DEBUG):
                traceback.print_exc()
            report(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:
            from llmctl.cli.output import stderr

            stderr.print("interrupted; unfinished output was removed")
            raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None
