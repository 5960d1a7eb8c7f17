"""Generation tasks: greedy answers scored by exact match, containment or a regular expression."""

from __future__ import annotations

import re
import time

from llmctl.errors import InputError
from llmctl.eval.data import Record, read_jsonl, sample_indices
from llmctl.eval.results import TaskResult, proportion_entry
from llmctl.eval.suite import GenerationTask
from llmctl.eval.tasks import EvalContext, dataset_entry, locate_data


def _expected(record: Record, field: str) -> list[str]:
    value = record.get(field)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise InputError(f"{record.where()}: field {field!r} must be a string or a list of strings")


def _prompt(record: Record, task: GenerationTask) -> tuple[str | None, list[dict[str, str]] | None]:
    if task.messages_field in record.data:
        messages = record.data[task.messages_field]
        valid = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        )
        if not valid:
            raise InputError(f"{record.where()}: field {task.messages_field!r} must be a list of {{role, content}} objects")
        return None, messages
    if task.prompt_field in record.data:
        prompt = record.data[task.prompt_field]
        if not isinstance(prompt, str):
            raise InputError(f"{record.where()}: field {task.prompt_field!r} must be a string")
        return prompt, None
    raise InputError(f"{record.where()}: missing field {task.prompt_field!r} or {task.messages_field!r}",
                     hint="each record needs a prompt string or a chat messages list")


def matches(output: str, expected: list[str], scorer: str, ignore_case: bool) -> bool:
    """Return True when ``output`` matches any of the expected answers under ``scorer``."""
    text = output.strip()
    for answer in expected:
        if scorer == "regex":
            if re.search(answer, text, flags=re.IGNORECASE if ignore_case else 0):
                return True
            continue
        left, right = (text.lower(), answer.strip().lower()) if ignore_case else (text, answer.strip())
        if (scorer == "exact" and left == right) or (scorer == "contains" and right in left):
            return True
    return False


def run(task: GenerationTask, context: EvalContext) -> TaskResult:
    """Generate an answer for every sampled record and report the fraction that match."""
    started = time.perf_counter()
    path = locate_data(task.data, context)
    records = read_jsonl(path)
    indices = sample_indices(len(records), context.sample_limit(task.limit), context.seed)
    chosen = [records[i] for i in indices]
    prepared = [(_prompt(record, task), _expected(record, task.answer_field)) for record in chosen]
    if task.scorer == "regex":
        for record, (_, expected) in zip(chosen, prepared, strict=True):
            for pattern in expected:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise InputError(f"{record.where()}: invalid regular expression {pattern!r}: {error}") from None

    context.progress.begin(task.name, len(prepared))
    hits, samples = [], []
    for (prompt, messages), expected in prepared:
        output = context.target.generate_text(
            prompt, messages, chat=task.chat, max_tokens=task.max_tokens, stop=task.stop, seed=context.seed,
        )
        hit = matches(output, expected, task.scorer, task.ignore_case)
        hits.append(1.0 if hit else 0.0)
        if len(samples) < 5:
            samples.append({"output": output, "expected": expected, "match": hit})
        context.progress.advance(1)

    metrics = {"accuracy": proportion_entry(hits)}
    return TaskResult(
        task.name, task.type, metrics=metrics, dataset=dataset_entry(path, records=len(records), used=len(chosen)),
        details={"scorer": task.scorer, "max_tokens": task.max_tokens, "examples": samples},
        duration_s=time.perf_counter() - started,
    )
