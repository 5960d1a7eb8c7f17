"""Speed: time to first token, prefill and decode throughput, peak memory, next to the profile."""

from __future__ import annotations

import time

from llmctl.eval.data import read_text
from llmctl.eval.results import TaskResult, mean_and_stderr, metric_entry
from llmctl.eval.suite import SpeedTask
from llmctl.eval.tasks import EvalContext
from llmctl.eval.tasks.parity import BUILTIN_PROMPTS
from llmctl.eval.target import median


def host_info() -> dict[str, object]:
    """Describe the machine the timings were taken on."""
    import os
    import platform

    import psutil

    return {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
        "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": psutil.virtual_memory().total,
    }


def _timing(values: list[float], unit: str, *, higher_is_better: bool, samples: int) -> dict:
    _, stderr = mean_and_stderr(values) if len(values) > 1 else (None, None)
    return metric_entry(median(values), samples=samples, stderr=stderr, unit=unit, higher_is_better=higher_is_better,
                        runs=[round(v, 4) for v in values])


def run(task: SpeedTask, context: EvalContext) -> TaskResult:
    """Time greedy generations of a fixed prompt and report medians over the repeats."""
    started = time.perf_counter()
    text = read_text(BUILTIN_PROMPTS)
    context.progress.begin(task.name, task.repeats)
    samples, peak = context.target.measure_speed(
        text, task.prompt_tokens, task.output_tokens, task.repeats, advance=context.progress.advance,
    )

    ttft = [s.ttft_s * 1000 for s in samples]
    prefill = [s.prompt_tokens / s.ttft_s for s in samples if s.ttft_s > 0]
    decode = [(s.output_tokens - 1) / s.decode_s for s in samples if s.decode_s > 0 and s.output_tokens > 1]
    count = len(samples)
    metrics = {
        "ttft_ms": _timing(ttft, "ms", higher_is_better=False, samples=count),
        "prefill_tps": _timing(prefill, "tokens/s", higher_is_better=True, samples=count) if prefill else metric_entry(None, samples=0),
        "decode_tps": _timing(decode, "tokens/s", higher_is_better=True, samples=count) if decode else metric_entry(None, samples=0),
        "peak_memory_mb": metric_entry(
            None if peak is None else peak / 1e6, samples=count, unit="MB", higher_is_better=False,
            reason=None if peak is not None else "memory of a remote server is not measurable from the client",
        ),
    }
    details = {
        "prompt_tokens": samples[0].prompt_tokens if samples else task.prompt_tokens,
        "output_tokens": samples[0].output_tokens if samples else task.output_tokens,
        "output_tokens_per_run": [s.output_tokens for s in samples],
        "repeats": task.repeats,
        "statistic": "median",
        "memory": "peak resident set size of the eval process while generating (model weights included)",
        "host": host_info() if context.target.kind == "local" else None,
        "profile": context.profile,
    }
    return TaskResult(task.name, task.type, metrics=metrics, details=details, duration_s=time.perf_counter() - started)
