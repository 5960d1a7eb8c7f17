"""Named registries for the pluggable parts: exporters, quantizers and runtime backends.

Built-in components register themselves through the same door a third-party package
uses: an entry point in the group of the registry (``llmctl.exporters``,
``llmctl.quantizers``, ``llmctl.backends``) whose value is the component's factory.
The built-ins are declared in ``BUILTINS`` below instead of in package metadata so that
an editable checkout without reinstalling still finds them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from llmctl.errors import UsageError

T = TypeVar("T")

# Registry group -> {name: "module:attribute"} of the components that ship with llmctl.
BUILTINS: dict[str, dict[str, str]] = {
    "llmctl.exporters": {
        "optimum": "llmctl.convert.exporters.optimum:OptimumExporter",
        "genai": "llmctl.convert.exporters.genai:GenAIBuilderExporter",
    },
    "llmctl.quantizers": {
        "int8": "llmctl.quantize.methods:Int8Quantizer",
        "int4": "llmctl.quantize.methods:Int4Quantizer",
    },
    "llmctl.backends": {
        "genai": "llmctl.runtime.genai:GenAIBackend",
        "ort": "llmctl.runtime.ort:OrtBackend",
        "torch": "llmctl.runtime.torch:TorchBackend",
    },
}


def _load_reference(reference: str) -> object:
    module_name, _, attribute = reference.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


class Registry(Generic[T]):
    """A name -> factory table filled from ``BUILTINS`` and from installed entry points.

    Factories are imported only when looked up, so listing names stays cheap and a
    broken third-party plugin cannot break unrelated commands.
    """

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._references: dict[str, str | Callable[..., T]] | None = None

    def _table(self) -> dict[str, str | Callable[..., T]]:
        if self._references is None:
            table: dict[str, str | Callable[..., T]] = dict(BUILTINS.get(self.group, {}))
            for entry_point in entry_points(group=self.group):
                table.setdefault(entry_point.name, entry_point.value)
            self._references = table
        return self._references

    def register(self, name: str, factory: Callable[..., T] | str) -> None:
        """Add or replace the component called ``name``.

        Args:
            name: the name users pass on the command line or in a profile.
            factory: a callable returning the component, or a ``"module:attribute"`` string.
        """
        self._table()[name] = factory

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._table())

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory registered as ``name``.

        Raises:
            UsageError: no component of this kind is registered under ``name``.
        """
        table = self._table()
        if name not in table:
            known = ", ".join(self.names())
            raise UsageError(f"unknown {self.kind} {name!r}", hint=f"choose one of: {known}")
        factory = table[name]
        if isinstance(factory, str):
            factory = _load_reference(factory)  # type: ignore[assignment]
            table[name] = factory
        return factory  # type: ignore[return-value]

    def create(self, name: str, *args: object, **kwargs: object) -> T:
        """Build the component called ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)


exporters: Registry = Registry("llmctl.exporters", "exporter")
quantizers: Registry = Registry("llmctl.quantizers", "quantization method")
backends: Registry = Registry("llmctl.backends", "runtime backend")
