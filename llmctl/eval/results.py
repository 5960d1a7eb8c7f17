"""The results document of ``llmctl eval``: a stable JSON schema, documented in docs/eval.md.

``SCHEMA_VERSION`` changes only when a field is removed or changes meaning; new fields may
be added within a version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import InputError

SCHEMA_VERSION = 1


def metric_entry(
    value: float | None,
    *,
    samples: int,
    stderr: float | None = None,
    unit: str | None = None,
    higher_is_better: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one metric entry of the results document."""
    entry = {
        "value": _finite(value), "stderr": _finite(stderr), "samples": samples, "unit": unit,
        "higher_is_better": higher_is_better,
    }
    entry.update(extra)
    return entry


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Return the mean and its standard error (sample standard deviation / sqrt(n))."""
    count = len(values)
    mean = math.fsum(values) / count
    if count < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def proportion_entry(hits: Sequence[float], **extra: Any) -> dict[str, Any]:
    """Build a metric entry for a proportion with its standard error and 95% Wilson interval."""
    from llmctl.eval.gates import wilson_interval

    value, stderr = mean_and_stderr(hits)
    low, high = wilson_interval(math.fsum(hits), len(hits))
    return metric_entry(value, samples=len(hits), stderr=stderr, higher_is_better=True, wilson95=[low, high], **extra)


@dataclass
class TaskResult:
    """The outcome of one task: its metrics, or why it was skipped."""

    name: str
    type: str
    status: str = "ok"  # "ok" or "skipped"
    reason: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "status": self.status, "reason": self.reason,
            "duration_s": round(self.duration_s, 3), "dataset": self.dataset, "metrics": self.metrics,
            "details": self.details,
        }


def skipped(name: str, type_: str, reason: str, metric_names: Sequence[str]) -> TaskResult:
    """Build the result of a task that could not run, with every metric absent and the reason."""
    metrics = {m: metric_entry(None, samples=0, reason=reason) for m in metric_names}
    return TaskResult(name, type_, status="skipped", reason=reason, metrics=metrics)


def flatten_metrics(tasks: Sequence[TaskResult]) -> dict[str, dict[str, Any]]:
    """Return ``task.metric`` -> entry across every task."""
    return {f"{task.name}.{name}": entry for task in tasks for name, entry in task.metrics.items()}


def load_results(path: Path) -> dict[str, Any]:
    """Read a results file written by ``llmctl eval --output`` (used as ``--baseline``).

    Raises:
        InputError: missing file, not JSON, or not an llmctl results document.
    """
    if not path.is_file():
        raise InputError(f"baseline file {path} not found", hint="pass a results.json written by llmctl eval --output")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict) or "schema_version" not in data:
        raise InputError(f"{path}: not an llmctl eval results file", hint="expected the JSON written by llmctl eval --output")
    if data["schema_version"] != SCHEMA_VERSION:
        raise InputError(f"{path}: results schema version {data['schema_version']} is not {SCHEMA_VERSION}")
    return data


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` through a temporary file, so a reader never sees half of it."""
    _write_atomically(path, json.dumps(document, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
