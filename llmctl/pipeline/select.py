"""Selection rules: which passing variant the pipeline hands over.

Every rule ranks only the variants that passed every gate, and breaks ties by size and then
by name, so the same results always select the same variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Candidate(Protocol):
    name: str
    passed: bool
    size_bytes: int
    metrics: dict[str, float | None]
    usd_per_million_tokens: float | None
    estimated_tokens_per_second: float | None


def _missing_last(value: float | None) -> float:
    return math.inf if value is None else value


def quality_key(candidate: Candidate) -> tuple[float, float, float]:
    """Rank by quality, best first: lowest KL divergence against the unquantized model, then
    lowest perplexity, then highest mean task accuracy.

    KL divergence comes first because the variants share one source, so drift from it is the
    most direct measure of what quantization cost. A metric the suite lacks ranks last.
    """
    metrics = candidate.metrics
    accuracy = metrics.get("accuracy_mean")
    return (
        _missing_last(metrics.get("kl_mean")),
        _missing_last(metrics.get("perplexity")),
        -accuracy if accuracy is not None else math.inf,
    )


def cost_key(candidate: Candidate) -> tuple[float, float]:
    """Rank by estimated dollars per million tokens, cheapest first.

    Every variant runs on the same profile, so cost is the hourly price divided by
    throughput. Without a price the variants are ranked by the estimated throughput alone,
    which gives the same order.
    """
    throughput = candidate.estimated_tokens_per_second
    return (_missing_last(candidate.usd_per_million_tokens), -throughput if throughput else math.inf)


RULES: dict[str, Callable[[Candidate], Any]] = {
    "cheapest": lambda c: (*cost_key(c), c.size_bytes, c.name),
    "smallest": lambda c: (c.size_bytes, c.name),
    "fastest": lambda c: (-(c.metrics.get("decode_tps") or 0.0), c.size_bytes, c.name),
    "best-quality": lambda c: (*quality_key(c), c.size_bytes, c.name),
}


def select_variant(candidates: Sequence[Candidate], rule: str) -> Candidate | None:
    """Return the passing candidate that ``rule`` ranks first, or None when none passed."""
    passing = [candidate for candidate in candidates if candidate.passed]
    if not passing:
        return None
    return min(passing, key=RULES[rule])
