"""The exception hierarchy of the llmctl library.

Library code raises these; the CLI turns each into a one-line message and an exit code
(``llmctl.cli.errors``). Every message names the value at fault and, where there is one,
the next step, so it can be shown to a user as it is.
"""

from __future__ import annotations


class LlmctlError(Exception):
    """Base class of every error llmctl raises on purpose.

    Attributes:
        exit_code: the process exit code the CLI uses for this error.
        hint: an optional next step, shown after the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(LlmctlError):
    """An invalid value given by the user: a path, an option, a combination of options."""

    exit_code = 2


class InputError(UsageError):
    """An input file that cannot be used: missing, corrupt, truncated or of the wrong kind."""


class ProfileError(UsageError):
    """A hardware profile that does not exist or does not validate."""


class UnsupportedError(UsageError):
    """A model architecture, task or format that the chosen component cannot handle."""


class OutputExistsError(UsageError):
    """An output path that already exists and was not allowed to be replaced."""


class ConversionError(LlmctlError):
    """An export or quantization that failed while running."""


class ParityError(LlmctlError):
    """A converted or quantized model whose outputs drifted past the profile's tolerance."""

    def __init__(self, message: str, *, parity: dict | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.parity = parity or {}


class RuntimeBackendError(LlmctlError):
    """A runtime backend that failed to load an artifact or to run it."""


class GateFailure(LlmctlError):
    """One or more evaluation gates failed."""
