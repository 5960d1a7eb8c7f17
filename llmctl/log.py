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

    from rich.logging import RichHandler

    root = logging.getLogger("llmctl")
    root.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        from rich.console import Console

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    quiet_third_party(show=level <= logging.DEBUG)


def quiet_third_party(*, show: bool) -> None:
    """Show the libraries' INFO records and warnings when ``show``, else only their errors.

    A handler on the process root logger keeps ``logging.basicConfig`` calls made at import
    time from installing their own INFO handler: onnxruntime's ``matmul_nbits_quantizer``
    does that, and then logs one line per skipped node (about 490 for SmolLM2).
    """
    from rich.console import Console
    from rich.logging import RichHandler

    process_root = logging.getLogger()
    if not any(getattr(h, _ROOT_HANDLER_FLAG, False) for h in process_root.handlers):
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
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
