"""Logging set-up under the ``llmctl`` root logger."""

from __future__ import annotations

import logging
import os

ENV_LOG_LEVEL = "LLMCTL_LOG_LEVEL"


def configure_logging(verbosity: int = 0) -> None:
    """Send llmctl's log records to stderr at a level from ``-v`` flags or ``LLMCTL_LOG_LEVEL``.

    Args:
        verbosity: 0 for warnings, 1 for info, 2 or more for debug. The environment
            variable wins when it is set.
    """
    level_name = os.environ.get(ENV_LOG_LEVEL)
    if level_name:
        level = logging.getLevelName(level_name.upper())
        if not isinstance(level, int):
            level = logging.WARNING
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)

    from rich.logging import RichHandler

    root = logging.getLogger("llmctl")
    root.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        from rich.console import Console

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
