"""``llmctl eval``: measure a model against a suite and gate on the results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.cli.options import JsonOpt, ProfileOpt


class _RichProgress:
    """One rich progress bar per task, with an ETA, on stderr."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task_id: Any = None

    def begin(self, description: str, total: int) -> None:
        self.task_id = self.progress.add_task(description, total=total or None)

    def advance(self, count: int = 1) -> None:
        if self.task_id is not None:
            self.progress.advance(self.task_id, count)


def eval_command(
    target: Annotated[
        Path | None, typer.Argument(help="Artifact folder or Hugging Face folder to evaluate; omit with --url.", show_default=False)
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="LLMCTL_API_KEY", help="Bearer token for --url.", show_default=False)
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model", help="Model name sent to --url; default: the first one the server lists.")
    ] = None,
    profile: ProfileOpt = None,
    suite: Annotated[
        str | None, typer.Option("--suite", "-s", help="Built-in suite (quick, full) or a suite YAML file; default: the profile's.")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="Reference model folder for the parity task, usually the unquantized model.")
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="results.json of an earlier run, for gates written against 'baseline'.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Samples per task (windows for perplexity), drawn with --seed.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed that picks the samples and seeds generation.")] = 0,
    gate: Annotated[
        list[str] | None, typer.Option("--gate", help="Extra gate, e.g. 'hellaswag.acc >= 0.35'; repeatable.")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="Runtime backend: auto, genai, ort or torch.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences scored per model call.")] = 4,
    threads: Annotated[
        int | None, typer.Option("--threads", min=0, help="Intra-op threads; 0 lets the runtime choose; default: the profile's.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results JSON here.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here: one test case per gate.")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary here (also appended to $GITHUB_STEP_SUMMARY).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for each server response.")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Measure quality, parity and speed, and exit 1 when a gate fails (2 on a usage or input error)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from llmctl.cli.output import emit_json, stderr, stdout
    from llmctl.errors import GateFailure, UsageError
    from llmctl.eval import EvalOptions, run_eval
    from llmctl.eval.report import format_value, terminal_tables

    if target is not None and url is not None:
        raise UsageError("give either a model folder or --url, not both", hint=f"drop {target} or --url {url}")
    options = EvalOptions(
        target=target, url=url, api_key=api_key, model_name=model_name, profile=profile, suite=suite,
        reference=reference, baseline=baseline, limit=limit, seed=seed, backend=backend, batch_size=batch_size,
        threads=threads, output=output, junit=junit, markdown=markdown, timeout_s=timeout, extra_gates=list(gate or []),
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        run = run_eval(options, progress=_RichProgress(progress))

    if as_json:
        emit_json(run.document)
    else:
        for table in terminal_tables(run.document):
            stdout.print(table)

    failed = run.failed_gates
    if failed:
        first = failed[0]
        raise GateFailure(
            f"{len(failed)} of {len(run.document['gates'])} gates failed: {first['expression']} "
            f"(observed {format_value(first['observed'])})",
            hint="see the gates table" + (f" or {output}" if output else ""),
        )
