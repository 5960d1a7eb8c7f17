"""Eval tasks: each turns a suite entry into a ``TaskResult`` through an eval target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmctl.artifacts import sha256_file
from llmctl.eval.results import TaskResult


class Progress(Protocol):
    """Where a task reports its progress: one bar per task."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, count: int = 1) -> None: ...


class NoProgress:
    def begin(self, description: str, total: int) -> None:
        return None

    def advance(self, count: int = 1) -> None:
        return None


@dataclass
class EvalContext:
    """What every task needs: the target, the options of the run and where the suite lives."""

    target: Any
    suite_file: Path
    seed: int = 0
    limit: int | None = None
    reference: Any = None
    reference_error: str | None = None
    progress: Progress = field(default_factory=NoProgress)
    profile: dict[str, Any] | None = None

    def sample_limit(self, task_limit: int | None) -> int | None:
        """Return the sample limit of a task: ``--limit`` when given, else the suite's."""
        return self.limit if self.limit is not None else task_limit


def dataset_entry(path: Path, records: int, used: int, **extra: Any) -> dict[str, Any]:
    """Describe a data file in the results: path, sha256, records in the file and records used."""
    entry = {"path": str(path), "sha256": sha256_file(path), "records": records, "samples": used}
    entry.update(extra)
    return entry


def runner_for(task_type: str) -> Callable[[Any, EvalContext], TaskResult]:
    """Return the function that runs a task of ``task_type``."""
    from llmctl.eval.tasks import generation, multiple_choice, parity, perplexity, speed

    return {
        "perplexity": perplexity.run,
        "multiple_choice": multiple_choice.run,
        "generation": generation.run,
        "parity": parity.run,
        "speed": speed.run,
    }[task_type]


class DataMissing(Exception):
    """An optional data file (under ``${LLMCTL_DATASETS}``) is absent: the task is skipped."""


def locate_data(value: str, context: EvalContext) -> Path:
    """Resolve a task's data path.

    Raises:
        DataMissing: the path is under ``${LLMCTL_DATASETS}`` and does not exist; the task is
            skipped with the message as its reason. A missing file given by any other path
            is left to the reader, which raises ``InputError``.
    """
    from llmctl.eval.suite import ENV_DATASETS, resolve_data_path

    path, optional = resolve_data_path(value, context.suite_file)
    if optional and not path.exists():
        raise DataMissing(f"{path} not found; set {ENV_DATASETS} to the folder that holds the evaluation data")
    return path
