"""Logging set-up under the ``llmctl`` root logger, and quieting the libraries llmctl drives."""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV_LOG_LEVEL = "LLMCTL_LOG_LEVEL"
# Warnings raised from these packages (TracerWarning, deprecations, export notes) are hidden
# below -vv, because they describe the libraries' internals, not anything a user can act on.
THIRD_PARTY_MODULES = r"(transformers|optimum|torch|onnxruntime|onnxruntime_genai|onnx|onnxscript)(\.|$)"
# Marks the root handler this module installs, so that repeated calls add it once.
_ROOT_HANDLER_FLAG = "_llmctl_root_handler"
# Marks the handler this module installs on the ``llmctl`` logger.
_LLMCTL_HANDLER_FLAG = "_llmctl_handler"
# Whether TRANSFORMERS_VERBOSITY was set here (and may be changed again) rather than by the user.
_transformers_verbosity_set = False


def configure_logging(verbosity: int = 0) -> None:
    """Send llmctl's log records to stderr at a level from ``-v`` flags or ``LLMCTL_LOG_LEVEL``.

    Libraries llmctl drives (ONNX Runtime's quantizer, transformers, optimum, PyTorch's
    tracer) log at INFO and warn freely; below ``-vv`` only their errors are shown.

    Args:
        verbosity: 0 for warnings, 1 for info, 2 or more for debug and the libraries' own
            INFO records and warnings. The environment variable wins when it is set.
    """
    level_name = os.environ.get(ENV_LOG_LEVEL)
    if level_name:
        level = logging.getLevelName(level_name.upper())
        if not isinstance(level, int):
            level = logging.WARNING
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)

    root = logging.getLogger("llmctl")
    root.setLevel(level)
    if not any(getattr(h, _LLMCTL_HANDLER_FLAG, False) for h in root.handlers):
        handler = stderr_handler("%(message)s")
        setattr(handler, _LLMCTL_HANDLER_FLAG, True)
        root.addHandler(handler)
    quiet_third_party(show=level <= logging.DEBUG)


def stderr_handler(message_format: str) -> logging.Handler:
    """Return a handler for stderr: rich columns on a terminal, one plain line per record elsewhere.

    Rich lays records out for an 80-column console when stderr is a file or a pipe, which
    splits long messages and traceback paths over several lines that grep cannot find.
    """
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter(message_format))
        return handler
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {message_format}"))
    return handler


def quiet_third_party(*, show: bool) -> None:
    """Show the libraries' INFO records and warnings when ``show``, else only their errors.

    A handler on the process root logger keeps ``logging.basicConfig`` calls made at import
    time from installing their own INFO handler: onnxruntime's ``matmul_nbits_quantizer``
    does that, and then logs one line per skipped node (about 490 for SmolLM2).
    """
    process_root = logging.getLogger()
    if not any(getattr(h, _ROOT_HANDLER_FLAG, False) for h in process_root.handlers):
        handler = stderr_handler("%(name)s: %(message)s")
        # llmctl records reach this handler through propagation, but its own handler shows them.
        handler.addFilter(lambda record: not record.name.startswith("llmctl"))
        setattr(handler, _ROOT_HANDLER_FLAG, True)
        process_root.addHandler(handler)
    process_root.setLevel(logging.INFO if show else logging.ERROR)

    # transformers and optimum log through their own handlers, which read this variable when
    # they are imported. A value the user exported is kept.
    global _transformers_verbosity_set
    if _transformers_verbosity_set or "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if show else "error"
        _transformers_verbosity_set = True
    verbosity = os.environ["TRANSFORMERS_VERBOSITY"]
    for module_name in ("transformers.utils.logging", "optimum.utils.logging"):
        library_logging = sys.modules.get(module_name)
        if library_logging is not None and verbosity in library_logging.log_levels:
            library_logging.set_verbosity(library_logging.log_levels[verbosity])
    if not show and not sys.stderr.isatty():
        # Raw tqdm bars (transformers' GGUF loader uses one) turn into noise in a log file.
        os.environ.setdefault("TQDM_DISABLE", "1")
    if not show:
        warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)


class _CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record.

    Test runners and Typer's ``CliRunner`` swap ``sys.stderr`` per command, and a handler
    that kept the stream it was created with would write to a closed file afterwards.
    """

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass  # StreamHandler.__init__ assigns it; the current sys.stderr is used instead
