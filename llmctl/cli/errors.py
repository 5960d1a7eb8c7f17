"""The one place where library exceptions become a one-line message and an exit code."""

from __future__ import annotations

import os
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


class LlmctlGroup(TyperGroup):
    """A command group that reports llmctl errors as one line instead of a traceback.

    Exceptions that are not ``LlmctlError`` keep their traceback: they are bugs. Setting
    ``LLMCTL_DEBUG=1`` shows the traceback of every error.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LlmctlError as error:
            if os.environ.get(ENV_DEBUG):
                raise
            report(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            from llmctl.cli.output import stderr

            stderr.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
