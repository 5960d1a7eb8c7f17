"""Perplexity of a text file with a sliding window, averaged over tokens."""

from __future__ import annotations

import math
import time

from llmctl.eval.data import read_text
from llmctl.eval.results import TaskResult, mean_and_stderr, metric_entry
from llmctl.eval.suite import PerplexityTask
from llmctl.eval.tasks import EvalContext, dataset_entry, locate_data


def run(task: PerplexityTask, context: EvalContext) -> TaskResult:
    """Score every token of the file once and report perplexity, mean NLL and bits per byte.

    ``--limit`` (or the task's ``limit``) caps the number of windows, taken from the start of
    the text so the same tokens are scored on every run.
    """
    started = time.perf_counter()
    path = locate_data(task.data, context)
    text = read_text(path)
    stride = task.stride or task.context
    max_windows = context.sample_limit(task.limit)

    reason = context.target.loglikelihood_unsupported()
    if reason:
        from llmctl.eval.results import skipped
        from llmctl.eval.suite import TASK_METRICS

        return skipped(task.name, task.type, reason, TASK_METRICS["perplexity"])

    rolling = context.target.rolling_logprobs(
        text, context=task.context, stride=stride, max_tokens=task.max_tokens, max_windows=max_windows,
        begin=lambda total: context.progress.begin(task.name, total), advance=context.progress.advance,
    )

    losses = [-value for value in rolling.logprobs]
    nll, nll_stderr = mean_and_stderr(losses)
    perplexity = math.exp(nll)
    count = len(losses)
    metrics = {
        # The delta method carries the NLL's standard error through exp().
        "perplexity": metric_entry(perplexity, samples=count, stderr=None if nll_stderr is None else perplexity * nll_stderr,
                                   higher_is_better=False),
        "nll": metric_entry(nll, samples=count, stderr=nll_stderr, unit="nats/token", higher_is_better=False),
        "bits_per_byte": metric_entry(
            math.fsum(losses) / math.log(2) / max(1, rolling.scored_text_bytes), samples=count, unit="bits/byte",
            higher_is_better=False,
        ),
    }
    details = dict(rolling.details, windows=rolling.windows, scored_tokens=count)
    dataset = dataset_entry(path, records=1, used=1)
    return TaskResult(task.name, task.type, metrics=metrics, dataset=dataset, details=details,
                      duration_s=time.perf_counter() - started)

