"""The models a server serves, looked up by the request's ``model`` field."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.runtime.base import Backend, GenerationStep
from llmctl.serve.errors import model_not_found, not_ready

logger = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """A model to serve.

    Attributes:
        source: an artifact folder (or a Hugging Face folder for the torch backend), or a
            backend instance that has not been loaded yet.
        name: the name clients pass as ``model``; default: the folder name.
        backend: ``auto``, ``genai``, ``ort`` or ``torch``; ignored when ``source`` is a backend.
        threads: intra-op threads; 0 lets the runtime choose, None takes the profile's.
        profile: a loaded profile, a built-in name or a profile file; None is the default profile.
    """

    source: Path | Backend
    name: str | None = None
    backend: str = "auto"
    threads: int | None = None
    profile: Any = None

    def served_name(self) -> str:
        if self.name:
            return self.name
        path = self.source.model_path if isinstance(self.source, Backend) else Path(self.source)
        return path.resolve().name


class TokenTexts:
    """Token id -> token text and raw bytes, cached, for log-probability entries."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._eos_ids: frozenset[int] | None = None

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            # A token that contains part of a multi-byte character decodes to U+FFFD here; its
            # raw bytes come from ``bytes_of``.
            text = self._backend.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def is_final_eos(self, step: GenerationStep) -> bool:
        """Return True for the end-of-sequence token that ended a generation: it is not part of
        the text, so log-probability lists leave it out and their bytes rebuild the text."""
        if step.finish_reason != "stop":
            return False
        if self._eos_ids is None:
            self._eos_ids = frozenset(self._backend.eos_token_ids)
        return step.token_id in self._eos_ids

    def bytes_of(self, token_id: int) -> list[int]:
        """Return the token's raw bytes as the OpenAI API lists them, so clients can rebuild split characters."""
        value = self._bytes.get(token_id)
        if value is None:
            raw = self._backend.token_bytes(token_id)
            value = list(raw if raw is not None else self(token_id).encode("utf-8"))
            self._bytes[token_id] = value
        return value


@dataclass
class ServedModel:
    """A loaded model and the name it is served under."""

    name: str
    backend: Backend
    created: int
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.backend)


class ModelPool:
    """The served models: loaded once at start-up, then looked up by name.

    Args:
        specs: the models to serve; their served names must be unique.

    Raises:
        UsageError: two models would be served under the same name.
    """

    def __init__(self, specs: Sequence[ModelSpec]) -> None:
        if not specs:
            raise UsageError("no model to serve", hint="pass at least one artifact folder")
        names = [spec.served_name() for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UsageError(
                f"several models would be served as {', '.join(map(repr, duplicates))}",
                hint="give each a distinct name with --served-model-name",
            )
        self.specs = list(specs)
        self.models: dict[str, ServedModel] = {}
        self.ready = False

    def names(self) -> list[str]:
        return [spec.served_name() for spec in self.specs]

    def check(self) -> None:
        """Check every model folder, backend name and thread count without loading anything.

        Raises:
            LlmctlError: the first model that cannot be opened (see ``prepare_backend``).
        """
        from llmctl.runtime import prepare_backend

        for spec in self.specs:
            if not isinstance(spec.source, Backend):
                prepare_backend(Path(spec.source), spec.backend, profile=spec.profile, threads=spec.threads)

    def load(self) -> None:
        """Load every model, blocking; ``ready`` turns True when all are loaded.

        Raises:
            LlmctlError: a model failed to load (from the backend).
        """
        from llmctl.runtime import open_backend

        for spec in self.specs:
            name = spec.served_name()
            started = time.perf_counter()
            if isinstance(spec.source, Backend):
                backend = spec.source
                backend.load()
            else:
                backend = open_backend(Path(spec.source), spec.backend, profile=spec.profile, threads=spec.threads)
            self.models[name] = ServedModel(name=name, backend=backend, created=int(time.time()))
            logger.info(
                "loaded model %s with the %s backend in %.1f s", name, backend.name, time.perf_counter() - started
            )
        self.ready = True

    def get(self, name: str) -> ServedModel:
        """Return the model served as ``name``.

        Raises:
            APIError: 503 while loading, 404 for a name that is not served.
        """
        if not self.ready:
            raise not_ready()
        model = self.models.get(name)
        if model is None:
            raise model_not_found(name, self.names())
        return model

    def close(self) -> None:
        """Release every loaded model."""
        for model in self.models.values():
            try:
                model.backend.close()
            except Exception:  # noqa: BLE001 - shutting down: log and go on with the others
                logger.exception("closing model %s failed", model.name)
        self.models.clear()
        self.ready = False
