"""Turn a variant's eval results and cost estimate into the figures of the report card."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import LlmctlError

if TYPE_CHECKING:
    from llmctl.pipeline.plan import Plan, PlannedVariant
    from llmctl.pipeline.run import VariantOutcome

logger = logging.getLogger(__name__)

# Report-card figure -> metric name suffix in the eval results (``task.metric``).
SUMMARY_METRICS = {
    "kl_mean": "kl_mean",
    "top1_agreement": "top1_agreement",
    "perplexity": "perplexity",
    "decode_tps": "decode_tps",
    "ttft_ms": "ttft_ms",
    "peak_memory_mb": "peak_memory_mb",
}
TASK_METRIC_SUFFIXES = ("acc", "acc_norm", "accuracy", "perplexity")
ACCURACY_SUFFIXES = ("acc", "accuracy")


def summarize_metrics(metrics: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Pick the report card's figures out of the ``task.metric`` entries of an eval results document.

    Returns:
        The summary (KL divergence, top-1 agreement, perplexity, decode tokens/s, time to first
        token, peak memory, mean task accuracy) and every task accuracy and perplexity by name.
        A figure the suite does not measure, or whose task was skipped, is None.
    """
    values = {name: entry.get("value") for name, entry in metrics.items() if isinstance(entry, dict)}
    summary: dict[str, float | None] = {}
    for figure, suffix in SUMMARY_METRICS.items():
        found = [value for name, value in values.items() if name.rsplit(".", 1)[-1] == suffix and value is not None]
        summary[figure] = found[0] if found else None

    accuracies = [v for n, v in values.items() if n.rsplit(".", 1)[-1] in ACCURACY_SUFFIXES and v is not None]
    summary["accuracy_mean"] = sum(accuracies) / len(accuracies) if accuracies else None
    tasks = {n: v for n, v in values.items() if n.rsplit(".", 1)[-1] in TASK_METRIC_SUFFIXES}
    return summary, tasks


@functools.lru_cache(maxsize=4)
def _source_stats(source: str) -> Any:
    from llmctl.cost.model_config import load_model_config
    from llmctl.cost.model_stats import model_stats

    return model_stats(load_model_config(source))


def estimate_cost(plan: Plan, variant: PlannedVariant) -> dict[str, Any]:
    """Return the cost model's estimate for the variant on the profile's hardware and workload."""
    from llmctl.cost.estimate import WorkloadSpec, estimate_profile
    from llmctl.pipeline.run import variant_profile

    profile = plan.profile
    if variant.quantization is not None:
        profile = variant_profile(profile, variant)
    workload = profile.workload
    spec = WorkloadSpec(
        prompt_tokens=workload.prompt_tokens,
        output_tokens=workload.output_tokens,
        concurrency=workload.concurrency,
        context=workload.context,
        kv_cache_dtype=workload.kv_cache_dtype,
    )
    return estimate_profile(_source_stats(str(plan.source)), profile, spec, quant=variant.precision).to_dict()


def collect_outcome(outcome: VariantOutcome, plan: Plan, variant: PlannedVariant) -> None:
    """Fill ``outcome`` from its eval results file and the cost model."""
    document = json.loads(Path(outcome.results_path).read_text(encoding="utf-8"))
    outcome.metrics, outcome.task_metrics = summarize_metrics(document.get("metrics", {}))
    outcome.gates = list(document.get("gates", []))

    try:
        outcome.cost = estimate_cost(plan, variant)
    except LlmctlError as error:
        # A missing cost estimate only weakens the "cheapest" rule; the variant still counts.
        logger.warning("no cost estimate for variant %s: %s", variant.name, error.message)
        return
    outcome.usd_per_million_tokens = outcome.cost.get("usd_per_million_tokens")
