"""Multiple-choice accuracy by the log-likelihood of each choice, as lm-evaluation-harness scores it.

Each choice is scored as the continuation ``" " + choice`` of the context. ``acc`` picks the
choice with the highest summed log-likelihood. ``acc_norm`` first divides each sum by the
length of the choice text in UTF-8 bytes. lm-evaluation-harness divides by ``len(choice)``,
which is the same for ASCII text.
"""

from __future__ import annotations

import time

from llmctl.eval.data import BUILTIN_FORMATS, ChoiceExample, Record, custom_example, read_jsonl, read_labels, sample_indices
from llmctl.eval.results import TaskResult, proportion_entry, skipped
from llmctl.eval.suite import TASK_METRICS, MultipleChoiceTask
from llmctl.eval.tasks import EvalContext, dataset_entry, locate_data

TARGET_DELIMITER = " "


def load_examples(task: MultipleChoiceTask, records: list[Record], labels: list[int] | None) -> list[ChoiceExample]:
    """Turn records into examples through the task's built-in or declared field mapping."""
    examples = []
    for position, record in enumerate(records):
        if labels is not None:
            record = Record(record.path, record.line, dict(record.data, label=labels[position]))
        if task.format == "custom":
            mapping = task.mapping
            assert mapping is not None  # the suite schema requires it for format: custom
            examples.append(custom_example(record, mapping.context, mapping.choices, mapping.label))
        else:
            examples.append(BUILTIN_FORMATS[task.format](record))
    return examples


def score_examples(lls_per_example: list[list[float]], examples: list[ChoiceExample]) -> tuple[list[float], list[float]]:
    """Return the per-example ``acc`` and ``acc_norm`` hits (1.0 or 0.0)."""
    acc, acc_norm = [], []
    for lls, example in zip(lls_per_example, examples, strict=True):
        best = max(range(len(lls)), key=lambda i: lls[i])
        normalized = [ll / max(1, len(choice.encode("utf-8"))) for ll, choice in zip(lls, example.choices, strict=True)]
        best_norm = max(range(len(normalized)), key=lambda i: normalized[i])
        acc.append(1.0 if best == example.gold else 0.0)
        acc_norm.append(1.0 if best_norm == example.gold else 0.0)
    return acc, acc_norm


def run(task: MultipleChoiceTask, context: EvalContext) -> TaskResult:
    """Score every sampled question and report ``acc`` and ``acc_norm``."""
    started = time.perf_counter()
    path = locate_data(task.data, context)
    records = read_jsonl(path)
    labels = None
    if task.labels is not None:
        labels = read_labels(locate_data(task.labels, context), len(records))
    indices = sample_indices(len(records), context.sample_limit(task.limit), context.seed)
    examples = load_examples(task, [records[i] for i in indices], None if labels is None else [labels[i] for i in indices])

    reason = context.target.loglikelihood_unsupported()
    if reason:
        return skipped(task.name, task.type, reason, TASK_METRICS["multiple_choice"])

    requests = [(example.context, TARGET_DELIMITER + choice) for example in examples for choice in example.choices]
    context.progress.begin(task.name, len(requests))
    flat = context.target.loglikelihoods(requests, advance=context.progress.advance)
    lls_per_example, position = [], 0
    for example in examples:
        lls_per_example.append(flat[position:position + len(example.choices)])
        position += len(example.choices)

    acc, acc_norm = score_examples(lls_per_example, examples)
    metrics = {"acc": proportion_entry(acc), "acc_norm": proportion_entry(acc_norm)}
    dataset = dataset_entry(path, records=len(records), used=len(examples), indices=indices)
    details = {"format": task.format, "choices_scored": len(requests)}
    return TaskResult(task.name, task.type, metrics=metrics, dataset=dataset, details=details,
                      duration_s=time.perf_counter() - started)

