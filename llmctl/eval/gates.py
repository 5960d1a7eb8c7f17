"""Gates: thresholds on metrics, absolute or relative to a baseline results file.

Grammar of a gate expression::

    [wilson_lower(] METRIC [)] OP RHS
    OP  := >= | <= | > | <
    RHS := NUMBER | baseline | baseline * NUMBER | baseline + NUMBER | baseline - NUMBER

``METRIC`` is ``task.metric`` or a bare metric name that exactly one task produces
(``decode_tps``). ``wilson_lower(m)`` compares the lower bound of the 95% Wilson score
interval of a proportion instead of the observed value, so a small sample does not pass by luck.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmctl.errors import InputError, UsageError

WILSON_Z = 1.959963984540054  # two-sided 95% normal quantile

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_GATE = re.compile(
    r"^\s*(?:(?P<bound>wilson_lower)\(\s*(?P<wrapped>[\w.-]+)\s*\)|(?P<metric>[\w.-]+))"
    r"\s*(?P<op>>=|<=|>|<)\s*"
    r"(?:(?P<baseline>baseline)(?:\s*(?P<combine>[*+-])\s*(?P<factor>[0-9.eE+-]+))?|(?P<number>[0-9.eE+-]+))\s*$"
)


@dataclass(frozen=True)
class Gate:
    """One parsed gate expression."""

    expression: str
    metric: str
    op: str
    bound: str  # "value" or "wilson_lower"
    threshold: float | None  # absolute threshold; None for a baseline-relative gate
    baseline_op: str | None = None  # "*", "+", "-" or "" for a bare "baseline"
    baseline_operand: float | None = None


class UnknownMetricError(InputError):
    """A gate names a metric that no task of the suite produces."""


def resolve_metric(name: str, known: Sequence[str], expression: str) -> str:
    """Return the full ``task.metric`` name that ``name`` refers to.

    Raises:
        InputError: no task produces that metric, or a bare name is ambiguous.
    """
    if name in known:
        return name
    matches = [full for full in known if full.split(".", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InputError(
            f"gate {expression!r}: metric {name!r} is ambiguous", hint=f"name one of: {', '.join(matches)}"
        )
    raise UnknownMetricError(
        f"gate {expression!r}: unknown metric {name!r}",
        hint=f"metrics of this suite: {', '.join(known) or '(none)'}",
    )


def parse_gate(expression: str, known_metrics: Sequence[str]) -> Gate:
    """Parse a gate expression and check its metric against ``known_metrics``.

    Raises:
        InputError: the expression does not follow the grammar, names an unknown metric, or
            applies ``wilson_lower`` to a metric that is not a proportion.
    """
    from llmctl.eval.suite import PROPORTION_METRICS

    match = _GATE.match(expression)
    if match is None:
        raise InputError(
            f"invalid gate {expression!r}",
            hint="write METRIC OP VALUE, e.g. 'hellaswag.acc >= 0.35' or 'wiki.perplexity <= baseline * 1.05'",
        )
    bound = "wilson_lower" if match["bound"] else "value"
    metric = resolve_metric(match["wrapped"] or match["metric"], known_metrics, expression)
    if bound == "wilson_lower" and metric.split(".", 1)[1] not in PROPORTION_METRICS:
        raise InputError(
            f"gate {expression!r}: wilson_lower applies only to proportions",
            hint=f"proportion metrics: {', '.join(sorted(PROPORTION_METRICS))}",
        )

    try:
        if match["baseline"]:
            operand = float(match["factor"]) if match["factor"] else None
            return Gate(expression, metric, match["op"], bound, None, match["combine"] or "", operand)
        return Gate(expression, metric, match["op"], bound, float(match["number"]))
    except ValueError:
        raise InputError(f"invalid number in gate {expression!r}") from None


def wilson_interval(successes: float, samples: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion (95% for the default ``z``)."""
    if samples <= 0:
        return (0.0, 1.0)
    p = successes / samples
    denominator = 1 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denominator
    return (max(0.0, centre - half_width), min(1.0, centre + half_width))


def _baseline_threshold(gate: Gate, baseline: dict[str, Any] | None) -> tuple[float | None, float | None, str | None]:
    """Return (threshold, baseline value, reason when the gate cannot be checked)."""
    if baseline is None:
        return None, None, "no baseline results given"
    entry = baseline.get("metrics", {}).get(gate.metric)
    if not entry or entry.get("value") is None:
        return None, None, f"baseline has no value for {gate.metric}"
    value = float(entry["value"])
    operand = gate.baseline_operand
    if gate.baseline_op == "*":
        return value * operand, value, None  # type: ignore[operator]
    if gate.baseline_op == "+":
        return value + operand, value, None  # type: ignore[operator]
    if gate.baseline_op == "-":
        return value - operand, value, None  # type: ignore[operator]
    return value, value, None


def check_gates(gates: Sequence[Gate], metrics: dict[str, dict[str, Any]], baseline: dict[str, Any] | None) -> list[dict]:
    """Evaluate each gate against the run's metrics.

    Args:
        gates: parsed gates.
        metrics: ``task.metric`` -> metric entry of the results (``value``, ``samples``, ...);
            a metric of a skipped task is absent or has ``value`` None.
        baseline: the ``--baseline`` results document, or None.

    Returns:
        One dict per gate with the expression, threshold, observed value, outcome
        (``pass``, ``fail`` or ``skipped``) and, when skipped, the reason.
    """
    outcomes = []
    for gate in gates:
        row: dict[str, Any] = {
            "expression": gate.expression, "metric": gate.metric, "op": gate.op, "bound": gate.bound,
            "threshold": gate.threshold, "baseline": None, "observed": None, "outcome": "skipped", "reason": None,
        }
        threshold = gate.threshold
        if threshold is None:
            threshold, row["baseline"], reason = _baseline_threshold(gate, baseline)
            row["threshold"] = threshold
            if reason:
                row["reason"] = reason
                outcomes.append(row)
                continue

        entry = metrics.get(gate.metric)
        if not entry or entry.get("value") is None:
            row["reason"] = (entry or {}).get("reason") or f"metric {gate.metric} was not measured"
            outcomes.append(row)
            continue

        observed = float(entry["value"])
        if gate.bound == "wilson_lower":
            observed = wilson_interval(observed * entry["samples"], entry["samples"])[0]
        row["observed"] = observed
        row["outcome"] = "pass" if _OPERATORS[gate.op](observed, threshold) else "fail"
        outcomes.append(row)
    return outcomes


def needs_baseline(gates: Sequence[Gate]) -> list[str]:
    """Return the expressions of the gates that compare against a baseline."""
    return [gate.expression for gate in gates if gate.threshold is None]


def require_baseline(gates: Sequence[Gate], baseline_given: bool) -> None:
    """Raise when a baseline-relative gate has no ``--baseline`` to compare with.

    Raises:
        UsageError: a gate refers to ``baseline`` and no baseline file was given.
    """
    relative = needs_baseline(gates)
    if relative and not baseline_given:
        raise UsageError(
            f"gate {relative[0]!r} compares against a baseline but no --baseline was given",
            hint="pass --baseline results.json from an earlier run",
        )
