"""Runtime backends: load an artifact, stream tokens, score log-probabilities.

``serve``, ``eval`` and ``generate`` all go through this layer: ``open_backend`` picks a
backend for a model folder and returns it loaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import InputError, UnsupportedError, UsageError

if TYPE_CHECKING:
    from llmctl.profiles.schema import Profile
    from llmctl.runtime.base import Backend

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "genai", "ort", "torch")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def _manifest_model(folder: Path) -> dict[str, Any]:
    manifest = folder / "llmctl.json"
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("cannot read %s; choosing the backend from the files", manifest)
        return {}
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, dict) else {}


def _manifest_runtime(folder: Path) -> str | None:
    runtime = _manifest_model(folder).get("runtime")
    return runtime if isinstance(runtime, str) else None


# Export tasks of a graph without a language model head (optimum's names).
NON_GENERATIVE_TASKS = ("feature-extraction", "fill-mask", "text-classification", "token-classification")


def _check_generative(folder: Path) -> None:
    """Reject an artifact whose manifest says it cannot generate text (an encoder, say)."""
    model = _manifest_model(folder)
    task = model.get("task")
    if task in NON_GENERATIVE_TASKS:
        raise UnsupportedError(
            f"{folder} is a {task} model ({model.get('architecture') or model.get('model_type')}) and cannot generate text",
            hint="convert a causal language model (an architecture ending in ForCausalLM)",
        )


def select_backend_name(path: Path, requested: str = "auto") -> str:
    """Choose the backend that runs the model in ``path``.

    ``auto`` follows the manifest's ``model.runtime`` when the folder can run it, else picks
    genai when ``genai_config.json`` exists, ort when there are ``.onnx`` files, and torch for
    a Hugging Face folder with safetensors or bin weights. A named backend is checked against
    the folder's contents.

    Args:
        path: the model folder.
        requested: "auto" or a registered backend name.

    Raises:
        InputError: the folder does not exist or contains no model that a backend can run.
        UnsupportedError: the named backend cannot run this folder, or its manifest says it
            has no language model head.
    """
    from llmctl.registry import backends

    folder = Path(path)
    if not folder.exists():
        raise InputError(f"model folder not found: {folder}", hint="pass an artifact folder made by llmctl convert")
    if not folder.is_dir():
        if folder.suffix.lower() == ".gguf":
            raise InputError(
                f"{folder} is a GGUF file, which llmctl runs only after converting it",
                hint=f"convert it first: llmctl convert {folder} -o DIR, then pass DIR",
            )
        raise InputError(f"{folder} is a file, not a model folder", hint="pass an artifact folder made by llmctl convert")

    _check_generative(folder)
    has_genai = (folder / "genai_config.json").is_file()
    has_onnx = any(folder.glob("*.onnx"))
    has_weights = (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)
    runnable = {"genai": has_genai, "ort": has_onnx, "torch": has_weights}

    if requested == "auto":
        preferred = _manifest_runtime(folder)
        if preferred in runnable and runnable[preferred]:
            return preferred
        for name in ("genai", "ort", "torch"):
            if runnable[name]:
                return name
        raise InputError(
            f"{folder} contains no model: no genai_config.json, no .onnx file and no Hugging Face weights",
            hint="convert a checkpoint first: llmctl convert SOURCE -o DIR",
        )

    if requested in runnable:
        if not runnable[requested]:
            needs = {
                "genai": "a genai_config.json (convert with --exporter genai)",
                "ort": "an .onnx file (convert the model first)",
                "torch": "config.json and safetensors or bin weights",
            }[requested]
            usable = [name for name, ok in runnable.items() if ok]
            hint = f"use --backend {usable[0]}" if usable else "convert a checkpoint first: llmctl convert SOURCE -o DIR"
            raise UnsupportedError(f"the {requested} backend cannot run {folder}: it needs {needs}", hint=hint)
        return requested

    if requested not in backends.names():
        raise UsageError(
            f"unknown runtime backend {requested!r}", hint=f"choose one of: auto, {', '.join(backends.names())}"
        )
    backends.get(requested)
    return requested


def check_threads(threads: int, *, source: str) -> None:
    """Reject an intra-op thread count above this machine's CPU count.

    More threads than cores only adds contention, and a typo such as 100000 makes the
    runtime allocate a pool so large that the process fills memory before it can load.

    Args:
        threads: the requested count; 0 lets the runtime choose.
        source: where the value came from, for the message (``--threads`` or the profile).

    Raises:
        UsageError: ``threads`` is negative or above ``os.cpu_count()``.
    """
    cores = os.cpu_count() or 1
    if 0 <= threads <= cores:
        return
    raise UsageError(
        f"{source} {threads} is outside 0..{cores}: this machine has {cores} CPU cores",
        hint=f"pass --threads with a value from 1 to {cores}, or 0 to let the runtime choose",
    )


def prepare_backend(
    model_path: Path | str,
    backend: str = "auto",
    *,
    profile: Profile | str | Path | None = None,
    threads: int | None = None,
) -> tuple[Path, str, Profile, int]:
    """Check everything about opening a model that can be checked without loading it.

    Args:
        model_path: see ``open_backend``.
        backend: see ``open_backend``.
        profile: see ``open_backend``.
        threads: see ``open_backend``.

    Returns:
        The model folder, the backend name, the loaded profile and the thread count.

    Raises:
        InputError, UnsupportedError: see ``select_backend_name``.
        ProfileError: the profile does not exist or does not validate.
        UsageError: the thread count is above the machine's CPU count.
    """
    from llmctl.pipeline import resolve_model_dir
    from llmctl.profiles.loader import load_profile

    # A pipeline output folder stands for the variant it selected.
    folder = resolve_model_dir(model_path)
    name = select_backend_name(folder, backend)
    if profile is None or isinstance(profile, (str, Path)):
        profile = load_profile(profile)
    if threads is None:
        thread_count = profile.runtime.threads
        check_threads(thread_count, source=f"profile {profile.name!r} sets runtime.threads")
    else:
        thread_count = threads
        check_threads(thread_count, source="--threads")
    return folder, name, profile, thread_count


def open_backend(
    model_path: Path | str,
    backend: str = "auto",
    *,
    profile: Profile | str | Path | None = None,
    threads: int | None = None,
    **options: Any,
) -> Backend:
    """Create the backend for ``model_path`` and load it.

    Args:
        model_path: an artifact folder, a Hugging Face folder for the torch backend, or a
            ``llmctl pipeline run`` output folder, which means its selected variant.
        backend: "auto", "genai", "ort", "torch" or a plugin's name.
        profile: a loaded profile, a built-in name or a profile file; it supplies the
            execution provider and the thread count. None uses the default profile.
        threads: intra-op threads, overriding the profile; 0 lets the runtime choose.
        **options: backend options, e.g. ``continuous_batching=False`` for the genai backend.

    Returns:
        A loaded backend.

    Raises:
        InputError, UnsupportedError: see ``select_backend_name``.
        ProfileError: the profile does not exist or does not validate.
        UsageError: the thread count is above the machine's CPU count.
        RuntimeBackendError: the runtime failed to load the model.
    """
    from llmctl.registry import backends

    folder, name, profile, thread_count = prepare_backend(model_path, backend, profile=profile, threads=threads)
    options.setdefault("execution_provider", profile.runtime.execution_provider)

    logger.info("opening %s with the %s backend", folder, name)
    instance = backends.create(name, folder, threads=thread_count, **options)
    instance.load()
    return instance
