"""``run_eval``: load the suite, open the target, run each task, check the gates, write the outputs."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import InputError, UsageError
from llmctl.eval.gates import Gate, UnknownMetricError, check_gates, parse_gate, require_baseline
from llmctl.eval.results import SCHEMA_VERSION, TaskResult, flatten_metrics, load_results, skipped
from llmctl.eval.suite import TASK_METRICS, Suite, load_suite
from llmctl.eval.tasks import DataMissing, EvalContext, NoProgress, Progress, runner_for

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".data", ".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class EvalOptions:
    """Everything ``llmctl eval`` takes; paths are as the user gave them."""

    target: Path | None = None
    url: str | None = None
    api_key: str | None = None
    model_name: str | None = None
    profile: str | None = None
    suite: str | None = None
    reference: Path | None = None
    baseline: Path | None = None
    limit: int | None = None
    seed: int = 0
    backend: str = "auto"
    batch_size: int = 4
    threads: int | None = None  # None: the profile's thread count
    output: Path | None = None
    junit: Path | None = None
    markdown: Path | None = None
    timeout_s: float = 300.0
    extra_gates: list[str] = field(default_factory=list)


def _load_profile(name: str | None) -> Any:
    from llmctl.profiles import load_profile

    return load_profile(name)


def _profile_summary(profile: Any) -> dict[str, Any]:
    hardware = profile.hardware
    return {
        "name": profile.name, "kind": hardware.kind, "hardware": hardware.name, "cores": hardware.cores,
        "memory_gb": hardware.memory_gb, "memory_bandwidth_gbps": hardware.memory_bandwidth_gbps,
        "execution_provider": profile.runtime.execution_provider, "threads": profile.runtime.threads,
    }


def _parse_gates(suite: Suite, profile: Any, extra: list[str]) -> list[Gate]:
    known = suite.metric_names()
    gates = [parse_gate(expression, known) for expression in suite.gates]
    for expression in list(profile.eval.gates) + list(extra):
        try:
            gates.append(parse_gate(expression, known))
        except InputError as error:
            from_profile = expression in profile.eval.gates and expression not in extra
            if from_profile and isinstance(error, UnknownMetricError):
                # A profile serves many suites; its gates apply where the suite measures the metric.
                logger.info("profile %s: gate %r skipped: suite %s does not measure its metric", profile.name, expression, suite.name)
                continue
            source = f"profile {profile.name}" if expression in profile.eval.gates else "--gate"
            raise InputError(f"{source}: {error.message}", hint=error.hint) from None
    return gates


def model_files_digest(folder: Path) -> dict[str, Any]:
    """Hash the weight files of a model folder.

    Returns:
        ``sha256``: a digest over the sorted ``path:sha256`` lines of the weight files (or of
        every file when none looks like weights), and ``files``: each file's own sha256.
    """
    from llmctl.artifacts import sha256_file

    if folder.is_file():
        return {"sha256": sha256_file(folder), "files": {folder.name: sha256_file(folder)}}
    every = sorted(p for p in folder.rglob("*") if p.is_file())
    weights = [p for p in every if p.name.endswith(WEIGHT_SUFFIXES)] or every
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in weights}
    combined = hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in files.items()).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def open_local_target(path: Path, backend: str, *, profile: Any, threads: int | None, batch_size: int) -> Any:
    """Load a model folder through a runtime backend chosen by ``llmctl.runtime.open_backend``.

    Raises:
        InputError, UnsupportedError: the folder is missing or no backend can run it.
        RuntimeBackendError: the runtime failed to load the model.
    """
    from llmctl.eval.target import LocalTarget
    from llmctl.runtime import open_backend

    return LocalTarget(open_backend(path, backend, profile=profile, threads=threads), batch_size=batch_size)


def _describe_target(options: EvalOptions, target: Any) -> dict[str, Any]:
    if options.url:
        return {"kind": "url", "location": options.url, "model": getattr(target, "model", None), "backend": None,
                "sha256": None, "files": {}}
    assert options.target is not None
    manifest = (options.target / "llmctl.json").is_file()
    kind = "artifact" if manifest else "hf-folder"
    digest = model_files_digest(options.target)
    return {"kind": kind, "location": str(options.target.resolve()), "backend": getattr(target.backend, "name", None),
            **digest}


def _run_task(task: Any, context: EvalContext) -> TaskResult:
    started = time.perf_counter()
    try:
        result = runner_for(task.type)(task, context)
    except DataMissing as missing:
        result = skipped(task.name, task.type, str(missing), TASK_METRICS[task.type])
    result.duration_s = result.duration_s or (time.perf_counter() - started)
    if result.status == "skipped":
        logger.warning("task %s skipped: %s", task.name, result.reason)
    return result


@dataclass
class EvalRun:
    """The finished run: the results document and whether every gate passed."""

    document: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(gate["outcome"] != "fail" for gate in self.document["gates"])

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [gate for gate in self.document["gates"] if gate["outcome"] == "fail"]


def run_eval(options: EvalOptions, progress: Progress | None = None) -> EvalRun:
    """Evaluate a model folder or a server against a suite and write the requested outputs.

    Args:
        options: the target, suite, reference, baseline and output paths.
        progress: receives one ``begin`` per task and ``advance`` per sample.

    Returns:
        The run; ``passed`` is False when any gate failed. Outputs are written either way.

    Raises:
        UsageError: conflicting or missing options (a target and a URL, a relative gate without
            a baseline), or an input that cannot be used (suite, data file, baseline, server).
    """
    started = time.perf_counter()
    if (options.target is None) == (options.url is None):
        raise UsageError("give either a model folder or --url, not both" if options.target else "no model to evaluate",
                         hint="pass an artifact folder, a Hugging Face folder, or --url http://host:port/v1")

    profile = _load_profile(options.profile)
    suite, suite_file = load_suite(options.suite or profile.eval.suite or "quick")
    gates = _parse_gates(suite, profile, options.extra_gates)
    require_baseline(gates, options.baseline is not None)
    baseline = load_results(options.baseline) if options.baseline else None
    if options.reference is not None and not options.reference.exists():
        raise InputError(f"reference folder {options.reference} not found", hint="pass the unquantized model's folder to --reference")

    target = _open_target(options, profile)
    reference = None
    try:
        if options.reference is not None:
            reference = open_local_target(
                options.reference, "auto", profile=profile, threads=options.threads, batch_size=options.batch_size
            )
        context = EvalContext(
            target=target, suite_file=suite_file, seed=options.seed, limit=options.limit, reference=reference,
            progress=progress or NoProgress(), profile=_profile_summary(profile),
        )
        results = [_run_task(task, context) for task in suite.tasks]
        document = _document(options, suite, suite_file, profile, target, reference, results, gates, baseline, started)
    finally:
        target.close()
        if reference is not None:
            reference.close()

    from llmctl.eval.report import write_outputs

    write_outputs(document, json_path=options.output, junit_path=options.junit, markdown_path=options.markdown)
    return EvalRun(document)


def _open_target(options: EvalOptions, profile: Any) -> Any:
    if options.url:
        from llmctl.eval.client import HttpTarget

        return HttpTarget(options.url, api_key=options.api_key, model=options.model_name, timeout_s=options.timeout_s)
    assert options.target is not None
    return open_local_target(
        options.target, options.backend, profile=profile, threads=options.threads, batch_size=options.batch_size
    )


def _document(
    options: EvalOptions, suite: Suite, suite_file: Path, profile: Any, target: Any, reference: Any,
    results: list[TaskResult], gates: list[Gate], baseline: dict[str, Any] | None, started: float,
) -> dict[str, Any]:
    from llmctl.artifacts import package_versions, sha256_file

    metrics = flatten_metrics(results)
    gate_rows = check_gates(gates, metrics, baseline)
    reference_entry = None
    if reference is not None and options.reference is not None:
        reference_entry = {"location": str(options.reference.resolve()), "backend": reference.backend.name,
                           **model_files_digest(options.reference)}
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "duration_s": round(time.perf_counter() - started, 3),
        "tool_versions": package_versions(("torch", "transformers", "onnxruntime", "onnxruntime-genai", "optimum", "httpx")),
        "target": _describe_target(options, target),
        "reference": reference_entry,
        "profile": _profile_summary(profile),
        "suite": {"name": suite.name, "path": str(suite_file), "sha256": sha256_file(suite_file)},
        "seed": options.seed,
        "limit": options.limit,
        "batch_size": options.batch_size,
        "baseline": None if options.baseline is None else str(options.baseline),
        "tasks": [result.to_json() for result in results],
        "metrics": metrics,
        "gates": gate_rows,
        "passed": all(row["outcome"] != "fail" for row in gate_rows),
    }


__all__ = ["EvalOptions", "EvalRun", "run_eval"]
