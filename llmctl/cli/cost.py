"""``llmctl cost-estimate``: does the model fit, how fast is it, and what does a million tokens cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.cli.options import JsonOpt
from llmctl.cli.output import emit_json, stdout

ProfilesOpt = Annotated[
    list[str] | None,
    typer.Option("--profile", "-p", help="Built-in profile name or YAML file; repeat for several. Default: the default profile.",
                 show_default=False),
]


def cost_estimate(
    model: Annotated[str, typer.Argument(help="Model folder or artifact, config.json, .gguf file, or hub id (config only).")],
    profile: ProfilesOpt = None,
    all_profiles: Annotated[bool, typer.Option("--all-profiles", help="Estimate on every built-in profile.")] = False,
    quant: Annotated[str | None, typer.Option("--quant", help="Weight precision: fp32, fp16, bf16, int8 or int4. Default: each profile's recipe.", show_default=False)] = None,
    prompt_tokens: Annotated[int | None, typer.Option("--prompt-tokens", help="Input tokens per request.", show_default=False)] = None,
    output_tokens: Annotated[int | None, typer.Option("--output-tokens", help="Generated tokens per request.", show_default=False)] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Streams generating at the same time.", show_default=False)] = None,
    requests_per_second: Annotated[float | None, typer.Option("--requests-per-second", help="Request arrival rate.", show_default=False)] = None,
    tokens_per_day: Annotated[float | None, typer.Option("--tokens-per-day", help="Input plus output tokens per day.", show_default=False)] = None,
    context: Annotated[int | None, typer.Option("--context", help="KV-cache tokens reserved per stream. Default: prompt + output.", show_default=False)] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", help="KV-cache precision: fp32, fp16, bf16 or int8.", show_default=False)] = None,
    calibrate: Annotated[Path | None, typer.Option("--calibrate", help="llmctl eval results JSON whose speed replaces its profile's efficiency factors.", show_default=False)] = None,
    max_ttft_ms: Annotated[float | None, typer.Option("--max-ttft-ms", help="Target: maximum time to first token in ms.", show_default=False)] = None,
    min_tokens_per_second: Annotated[float | None, typer.Option("--min-tokens-per-second", help="Target: minimum tokens/s per stream.", show_default=False)] = None,
    price_per_hour: Annotated[float | None, typer.Option("--price-per-hour", help="USD per instance-hour for profiles that have no price.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory, speed and cost of MODEL on hardware profiles, cheapest first.

    Reads only the model's configuration. Rows that do not fit in memory or miss a latency
    target are marked; the cheapest profile that meets the targets is named.
    """
    from llmctl.cost import CostRequest
    from llmctl.cost import cost_estimate as run_estimate
    from llmctl.errors import UsageError

    if kv_cache_dtype is not None and kv_cache_dtype not in {"fp32", "fp16", "bf16", "int8"}:
        raise UsageError(f"--kv-cache-dtype {kv_cache_dtype!r} is not known", hint="choose fp32, fp16, bf16 or int8")
    report = run_estimate(CostRequest(
        model=model, profiles=list(profile or []), all_profiles=all_profiles, quant=quant,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=concurrency,
        requests_per_second=requests_per_second, tokens_per_day=tokens_per_day, context=context,
        kv_cache_dtype=kv_cache_dtype, calibrate=calibrate, max_ttft_ms=max_ttft_ms,
        min_tokens_per_second=min_tokens_per_second, price_per_hour=price_per_hour,
    ))
    if as_json:
        emit_json(report.to_dict())
        return
    _render(report)


def _money(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _render(report: Any) -> None:
    from rich.table import Table

    model = report.model
    workload = report.workload
    load = (f"{workload['concurrency']} concurrent streams" if workload["concurrency"]
            else f"{workload['requests_per_second']:.3g} requests/s")
    stdout.print(
        f"[bold]{model['name']}[/]: {model['total_params']:,} parameters"
        + (f" ({model['active_params']:,} active per token)" if model["experts"] else "")
        + f", KV cache {model['kv_bytes_per_token_fp16']:,} bytes/token in fp16"
        + (f" ({model['sliding_window_layers']} sliding-window layers)" if model["sliding_window_layers"] else ""),
        highlight=False,
    )
    stdout.print(f"workload: {workload['prompt_tokens']} prompt + {workload['output_tokens']} output tokens, {load}, "
                 f"KV {workload['kv_cache_dtype']} x {workload['kv_length']} tokens per stream", highlight=False)

    table = Table("profile", "quant", "GB need/have", "inst.", "TTFT ms", "tok/s stream", "tok/s inst.", "$/h",
                  "$/M tokens", "status")
    footnotes = []
    for row in report.rows:
        if row.profile == report.cheapest:
            status = "[bold green]cheapest[/]"
        elif row.meets_targets:
            status = "[green]ok[/]"
        else:
            footnotes.append(f"{row.profile}: " + "; ".join(row.problems))
            status = f"[red]see note {len(footnotes)}[/]"
        table.add_row(
            row.profile, row.precision, f"{row.memory_needed_gb:.2f}/{row.memory_gb:g}", str(row.instances or "-"),
            _number(row.ttft_ms), _number(row.tokens_per_second_per_stream),
            _number(row.tokens_per_second_per_instance), _money(row.usd_per_hour), _money(row.usd_per_million_tokens),
            status,
        )
    stdout.print(table)
    for number, footnote in enumerate(footnotes, start=1):
        stdout.print(f"{number}. {footnote}", highlight=False)
    for record in report.calibrations:
        _render_calibration(record)
    if report.cheapest:
        stdout.print(f"cheapest profile meeting the targets: [bold]{report.cheapest}[/]", highlight=False)
    for note in report.notes:
        stdout.print(f"note: {note}", highlight=False)


def _render_calibration(record: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("metric", "measured", "estimate before", "estimate after", title=f"calibration of {record['profile']}")
    for metric in ("decode_tps", "prefill_tps"):
        table.add_row(metric, _number(record["measured"][metric]), _number(record["estimate_before"][metric]),
                      _number(record["estimate_after"][metric]))
    before, after = record["efficiency_before"], record["efficiency_after"]
    table.add_row("efficiency (prefill/decode)", "", f"{before['prefill']:.3f}/{before['decode']:.3f}",
                  f"{after['prefill']:.3f}/{after['decode']:.3f}")
    stdout.print(table)
    for note in record["notes"]:
        stdout.print(f"note: {note}", highlight=False)
