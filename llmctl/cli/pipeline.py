"""``llmctl pipeline run``: build, evaluate and select model variants for a hardware profile."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import JsonOpt, ProfileOpt
from llmctl.cli.output import emit_json, human_bytes, stderr, stdout

if TYPE_CHECKING:
    from llmctl.pipeline.preflight import Preflight
    from llmctl.pipeline.run import PipelineResult, StepEvent

app = typer.Typer(help="Build, evaluate and select model variants for a hardware profile.", no_args_is_help=True)

# Width for tables when stdout is not a terminal: wide enough that no cell of the result
# table is cut short in a file or CI log, where rich would otherwise assume 80 columns.
UNBOUNDED_WIDTH = 1000


def _table_console():
    """Return the console for tables: stdout itself on a terminal, a wide one otherwise."""
    if stdout.is_terminal:
        return stdout
    from rich.console import Console

    return Console(width=UNBOUNDED_WIDTH, soft_wrap=True)


SELECT_HELP = "Selection rule among passing variants: cheapest, smallest, fastest or best-quality; default: the profile's."


def _show_event(event: StepEvent) -> None:
    if event.phase == "start":
        stderr.print(f"[bold]→ {event.step}[/]: {event.action} …", highlight=False)
    elif event.phase == "cached":
        stderr.print(f"[dim]• {event.step}: cached ({event.action})[/]", highlight=False)
    elif event.phase == "done":
        stderr.print(f"[green]✓ {event.step}[/] done in {event.duration_s:.1f} s", highlight=False)
    else:
        stderr.print(f"[red]✗ {event.step}[/] failed after {event.duration_s:.1f} s: {event.error}", highlight=False, markup=True)


def _show_preflight(preflight: Preflight) -> None:
    for check in preflight.checks:
        mark = "[green]ok[/]" if check.ok else "[red]failed[/]"
        stderr.print(f"pre-flight {check.name}: {mark} ({check.detail})", highlight=False)


def _show_plan(result: PipelineResult) -> None:
    from rich.table import Table

    from llmctl.pipeline.cache import StepCache
    from llmctl.pipeline.run import CACHE_DIR

    plan = result.plan
    cache = StepCache(plan.out / CACHE_DIR)
    sizes = result.preflight.estimates.get("variant_weight_bytes", {})
    stdout.print(f"plan: {plan.source} on profile {plan.profile.name}, suite {plan.suite}, select {plan.select}", highlight=False)
    table = Table("step", "does", "cache key", "state")
    from llmctl.pipeline.run import describe

    for step in plan.steps():
        table.add_row(step.label, describe(step, plan), step.key[:12], "cached" if cache.is_done(step) else "to run")
    _table_console().print(table)
    variants = Table("variant", "quantization", "weights (estimate)")
    for variant in plan.variants:
        q = variant.quantization
        described = "none (converted model)" if q is None else f"{q.method} {q.mode if q.method == 'int8' else f'block {q.block_size}'}"
        variants.add_row(variant.name, described, human_bytes(sizes.get(variant.name, 0)))
    _table_console().print(variants)
    estimates = result.preflight.estimates
    stdout.print(
        f"estimates: {estimates.get('parameters', 0):,} parameters, disk {human_bytes(estimates.get('disk_bytes_needed', 0))}"
        f" to write, peak memory {human_bytes(estimates.get('memory_bytes_needed', 0))}",
        highlight=False,
    )


def _show_card(result: PipelineResult) -> None:
    from rich.table import Table

    from llmctl.pipeline.report import COLUMNS, card_row

    table = Table("variant", *(title for _, title in COLUMNS), "result")
    for variant in result.variants:
        verdict = "[green]passed[/]" if variant.passed else "[red]failed[/]"
        name = f"[bold]{variant.name}[/] (selected)" if variant.name == result.selected else variant.name
        row = card_row(variant)
        table.add_row(name, *(row[key] for key, _ in COLUMNS), verdict)
    _table_console().print(table)
    if result.selected:
        stdout.print(f"selected {result.selected} by rule {result.plan.select}: {result.plan.out / 'selected'}", highlight=False)
    for kind, path in result.reports.items():
        stdout.print(f"report ({kind}): {path}", highlight=False)
    steps = {status: sum(1 for s in result.steps if s.status == status) for status in ("built", "cached", "failed")}
    rerun = " (failed steps run again on the next run)" if steps["failed"] else ""
    stderr.print(
        f"{steps['built']} steps built, {steps['cached']} cached, {steps['failed']} failed in {result.duration_s:.1f} s{rerun}",
        highlight=False,
    )


def _gate_failure(result: PipelineResult) -> Exception:
    from llmctl.errors import GateFailure

    lines = ["no variant passed every gate"]
    lines += [f"{variant.name}: {'; '.join(variant.missed_gates())}" for variant in result.variants]
    return GateFailure("\n".join(lines), hint=f"see {result.reports.get('markdown', result.plan.out)}")


@app.command("run")
def run(
    source: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder or .gguf file.", show_default=False)],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Pipeline folder: cache, variants, selected and reports.", show_default=False)
    ],
    profile: ProfileOpt = None,
    variants: Annotated[
        str | None, typer.Option("--variants", help="Comma-separated variant names to build; default: all of the profile's.")
    ] = None,
    select: Annotated[str | None, typer.Option("--select", autocompletion=lambda: ["cheapest", "smallest", "fastest", "best-quality"], help=SELECT_HELP, show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the pre-flight estimates, then stop.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert SOURCE, quantize each variant, evaluate each with the profile's suite, pick one.

    Exit code 0 when a variant passes every gate, 1 when none does, 2 for usage or input errors.
    """
    from llmctl.pipeline.plan import check_select_rule
    from llmctl.pipeline.run import run_pipeline
    from llmctl.profiles import load_profile

    if select is not None:
        check_select_rule(select)
    names = variants.split(",") if variants is not None else None
    result = run_pipeline(
        source, output, profile=load_profile(profile), variants=names, select=select, dry_run=dry_run,
        on_event=_show_event,
    )

    if dry_run:
        if as_json:
            emit_json(result.to_dict())
        else:
            _show_plan(result)
            _show_preflight(result.preflight)
        result.preflight.raise_for_failures()
        return

    if as_json:
        emit_json(result.to_dict())
    else:
        _show_card(result)
    if not result.passed:
        raise _gate_failure(result)
