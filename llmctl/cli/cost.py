"""``llmctl cost-estimate``: does the model fit, how fast is it, and what does a million tokens cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.cli.options import JsonOpt, float_option
from llmctl.cli.output import emit_json, print_table, stderr, stdout

ProfilesOpt = Annotated[
    list[str] | None,
    typer.Option("--profile", "-p", metavar="PROFILE",
                 help="Built-in profile name or YAML file; repeat for several. Default: $LLMCTL_PROFILE or cpu-x86-avx2.",
                 show_default=False),
]


def cost_estimate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model folder or artifact, config.json, .gguf file, or hub id (config only).", show_default=False)],
    profile: ProfilesOpt = None,
    all_profiles: Annotated[bool, typer.Option("--all-profiles", metavar="", help="Estimate on every built-in profile.")] = False,
    quant: Annotated[str | None, typer.Option("--quant", metavar="PRECISION", help="Weight precision: fp32, fp16, bf16, int8 or int4. Default: each profile's recipe.", show_default=False)] = None,
    prompt_tokens: Annotated[int | None, typer.Option("--prompt-tokens", metavar="N", min=1, help="Input tokens per request. Default: each profile's workload.", show_default=False)] = None,
    output_tokens: Annotated[int | None, typer.Option("--output-tokens", metavar="N", min=1, help="Generated tokens per request. Default: each profile's workload.", show_default=False)] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", metavar="N", min=1, help="Streams generating at the same time. Default: each profile's workload.", show_default=False)] = None,
    requests_per_second: Annotated[float | None, float_option("--requests-per-second", metavar="RATE", help="Request arrival rate in requests/s (> 0).", show_default=False)] = None,
    tokens_per_day: Annotated[float | None, float_option("--tokens-per-day", metavar="N", help="Input plus output tokens per day (> 0).", show_default=False)] = None,
    context: Annotated[int | None, typer.Option("--context", metavar="N", min=1, help="KV-cache tokens reserved per stream. Default: each profile's workload, else prompt + output.", show_default=False)] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", metavar="DTYPE", help="KV-cache precision: fp32, fp16, bf16 or int8. Default: each profile's workload.", show_default=False)] = None,
    calibrate: Annotated[Path | None, typer.Option("--calibrate", metavar="FILE", help="llmctl eval results JSON whose speed replaces its profile's efficiency factors.", show_default=False)] = None,
    max_ttft_ms: Annotated[float | None, float_option("--max-ttft-ms", metavar="MS", help="Target: maximum time to first token in ms (> 0).", show_default=False)] = None,
    min_tokens_per_second: Annotated[float | None, float_option("--min-tokens-per-second", metavar="RATE", help="Target: minimum tokens/s per stream (> 0).", show_default=False)] = None,
    price_per_hour: Annotated[float | None, float_option("--price-per-hour", metavar="USD", help="USD per instance-hour for profiles that have no price (>= 0).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory, speed and cost of MODEL on hardware profiles, cheapest first.

    Reads only the model's configuration. Each profile is estimated with its own workload
    settings unless an option sets them. Rows that do not fit in memory or miss a latency
    target are marked; the cheapest priced profile that meets the targets is named.
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
    varies = set(workload["varies_by_profile"])
    kv_dtypes = list(dict.fromkeys(row.workload["kv_cache_dtype"] for row in report.rows))
    kv_sizes = ", ".join(f"{model['kv_bytes_per_token'][dtype]:,} in {dtype}" for dtype in kv_dtypes)
    stdout.print(
        f"[bold]{model['name']}[/]: {model['total_params']:,} parameters"
        + (f" ({model['active_params']:,} active per token)" if model["experts"] else "")
        + f", KV cache bytes/token: {kv_sizes}"
        + (f" ({model['sliding_window_layers']} sliding-window layers)" if model["sliding_window_layers"] else ""),
        highlight=False,
    )
    shared = [_describe_workload(workload, sorted(_WORKLOAD_PARTS.keys() - _varying_parts(varies)))]
    if varies:
        shared.append("per profile: see the workload column")
    stdout.print("workload: " + "; ".join(part for part in shared if part), highlight=False)

    per_row = sorted(_varying_parts(varies))
    table = Table("profile", "quant", *(["workload"] if per_row else []), "GB need/have", "inst.", "TTFT ms",
                  "tok/s stream", "tok/s inst.", "$/h", "$/M tokens", "status")
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
            row.profile, row.precision, *([_describe_workload(row.workload, per_row, compact=True)] if per_row else []),
            f"{row.memory_needed_gb:.2f}/{row.memory_gb:g}", str(row.instances or "-"),
            _number(row.ttft_ms), _number(row.tokens_per_second_per_stream),
            _number(row.tokens_per_second_per_instance), _money(row.usd_per_hour), _money(row.usd_per_million_tokens),
            status,
        )
    print_table(table)
    for number, footnote in enumerate(footnotes, start=1):
        stdout.print(f"{number}. {footnote}", highlight=False)
    for record in report.calibrations:
        _render_calibration(record)
    if report.cheapest:
        targets_set = any(value is not None for row in report.rows for value in row.targets.values())
        label = "cheapest profile meeting the targets" if targets_set else "cheapest profile that fits"
        stdout.print(f"{label}: [bold]{report.cheapest}[/]", highlight=False)
    for note in report.notes:
        stdout.print(f"note: {note}", highlight=False)
    for warning in report.warnings:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False)


# Parts of the workload line, and the report's workload keys each one shows.
_WORKLOAD_PARTS = {
    "tokens": ("prompt_tokens", "output_tokens"),
    "load": ("concurrency", "requests_per_second", "tokens_per_day"),
    "kv": ("kv_length", "kv_cache_dtype"),
}


def _varying_parts(varies: set[str]) -> set[str]:
    return {part for part, keys in _WORKLOAD_PARTS.items() if varies.intersection(keys)}


def _describe_workload(workload: dict[str, Any], parts: list[str], *, compact: bool = False) -> str:
    """Describe the chosen ``parts`` of one workload; ``compact`` for a table cell."""
    words = []
    if "tokens" in parts:
        prompt, output = workload["prompt_tokens"], workload["output_tokens"]
        words.append(f"{prompt}+{output} tokens" if compact else f"{prompt} prompt + {output} output tokens")
    if "load" in parts:
        streams = workload["concurrency"]
        if streams:
            words.append(f"{streams} stream{'' if streams == 1 else 's'}" if compact
                         else f"{streams} concurrent stream{'' if streams == 1 else 's'}")
        else:
            words.append(f"{workload['requests_per_second']:.3g} requests/s")
    if "kv" in parts:
        dtype, length = workload["kv_cache_dtype"], workload["kv_length"]
        words.append(f"KV {dtype} x {length}" if compact else f"KV cache {dtype} x {length} tokens per stream")
    return ", ".join(words)


def _render_calibration(record: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("metric", "measured", "estimate before", "estimate after", title=f"calibration of {record['profile']}")
    for metric in ("decode_tps", "prefill_tps"):
        table.add_row(metric, _number(record["measured"][metric]), _number(record["estimate_before"][metric]),
                      _number(record["estimate_after"][metric]))
    before, after = record["efficiency_before"], record["efficiency_after"]
    table.add_row("efficiency (prefill/decode)", "", f"{before['prefill']:.3f}/{before['decode']:.3f}",
                  f"{after['prefill']:.3f}/{after['decode']:.3f}")
    print_table(table)
    for note in record["notes"]:
        stdout.print(f"note: {note}", highlight=False)
