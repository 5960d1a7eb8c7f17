"""Parity with a reference model: next-token KL divergence, top-1 and greedy agreement, logit difference.

The model and the reference read the same token ids (cut from the task's text with the
model's tokenizer), so the comparison is position by position.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np

from llmctl.eval.data import read_text
from llmctl.eval.results import TaskResult, mean_and_stderr, metric_entry, proportion_entry, skipped
from llmctl.eval.suite import TASK_METRICS, ParityTask
from llmctl.eval.tasks import EvalContext, dataset_entry, locate_data

BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "suites" / "prompts.txt"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return the log-softmax over the last axis, in float64."""
    values = logits.astype(np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(model: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray | float]:
    """Compare two ``(positions, vocab)`` logit arrays.

    Returns:
        ``kl``: KL(reference || model) per position in nats; ``top1``: 1.0 where the arg-max
        tokens agree; ``max_logit_diff``: the largest absolute logit difference.
    """
    vocab = min(model.shape[-1], reference.shape[-1])
    model, reference = model[:, :vocab], reference[:, :vocab]
    log_p = log_softmax(reference)
    log_q = log_softmax(model)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    top1 = (model.argmax(axis=-1) == reference.argmax(axis=-1)).astype(np.float64)
    max_diff = float(np.abs(model.astype(np.float64) - reference.astype(np.float64)).max())
    return {"kl": kl, "top1": top1, "max_logit_diff": max_diff}


def common_prefix(first: list[int], second: list[int]) -> int:
    """Return how many leading tokens two sequences share."""
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def _prompts(task: ParityTask, context: EvalContext, token_ids: list[int]) -> list[list[int]]:
    """Cut ``samples`` prompts of ``length`` tokens at seeded offsets."""
    length = min(task.length, len(token_ids))
    starts = range(0, len(token_ids) - length + 1)
    rng = random.Random(context.seed)
    picked = sorted(rng.sample(starts, min(task.samples, len(starts))))
    return [token_ids[start:start + length] for start in picked]


def run(task: ParityTask, context: EvalContext) -> TaskResult:
    """Compare the model with ``--reference`` on seeded prompts."""
    started = time.perf_counter()
    metric_names = TASK_METRICS["parity"]
    if context.reference is None:
        return skipped(task.name, task.type, context.reference_error or "no --reference model given", metric_names)
    backend = getattr(context.target, "backend", None)
    if backend is None:
        return skipped(task.name, task.type, "parity needs full logits, which an HTTP server does not return", metric_names)

    path = locate_data(task.data, context) if task.data else BUILTIN_PROMPTS
    text = read_text(path)
    token_ids = backend.encode(text, add_special_tokens=False)
    token_ids = token_ids[: max(task.length * task.samples * 4, task.length)]
    prompts = _prompts(task, context, token_ids)
    reference = context.reference.backend

    context.progress.begin(task.name, len(prompts))
    kl, top1, greedy = [], [], []
    max_diff = 0.0
    for prompt in prompts:
        compared = compare_logits(np.asarray(backend.next_token_logits(prompt)), np.asarray(reference.next_token_logits(prompt)))
        kl.extend(compared["kl"].tolist())  # type: ignore[union-attr]
        top1.extend(compared["top1"].tolist())  # type: ignore[union-attr]
        max_diff = max(max_diff, float(compared["max_logit_diff"]))  # type: ignore[arg-type]

        ours = context.target.generate_ids(prompt, task.greedy_tokens, seed=context.seed, ignore_eos=True)
        theirs = context.reference.generate_ids(prompt, task.greedy_tokens, seed=context.seed, ignore_eos=True)
        greedy.append(common_prefix(ours, theirs) / task.greedy_tokens)
        context.progress.advance(1)

    kl_mean, kl_stderr = mean_and_stderr(kl)
    greedy_mean, greedy_stderr = mean_and_stderr(greedy)
    metrics = {
        "kl_mean": metric_entry(kl_mean, samples=len(kl), stderr=kl_stderr, unit="nats", higher_is_better=False),
        "top1_agreement": proportion_entry(top1),
        # Fraction of the greedy tokens generated before the first divergence, averaged over prompts.
        "greedy_agreement": metric_entry(greedy_mean, samples=len(greedy), stderr=greedy_stderr, higher_is_better=True),
        "max_logit_diff": metric_entry(max_diff, samples=len(kl), higher_is_better=False),
    }
    dataset = dataset_entry(path, records=1, used=len(prompts))
    details = {"prompt_tokens": len(prompts[0]) if prompts else 0, "greedy_tokens": task.greedy_tokens,
               "reference": str(reference.model_path)}
    return TaskResult(task.name, task.type, metrics=metrics, dataset=dataset, details=details,
                      duration_s=time.perf_counter() - started)
