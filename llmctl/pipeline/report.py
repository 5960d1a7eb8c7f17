"""The report card of a pipeline run: JSON, Markdown and a self-contained HTML page.

The HTML page embeds its chart (quality against size and against decode speed, drawn with
matplotlib) as a base64 PNG, so the file can be mailed or attached to a CI run as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.artifacts import now_iso

if TYPE_CHECKING:
    from llmctl.pipeline.run import PipelineResult, VariantOutcome

REPORT_NAMES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}
CHART_ID = "quality-chart"

# Quality axis of the chart, in order of preference: the first figure any variant has.
QUALITY_FIGURES = (
    ("perplexity", "perplexity (lower is better)"),
    ("kl_mean", "KL divergence vs unquantized (lower is better)"),
    ("accuracy_mean", "mean task accuracy (higher is better)"),
    ("top1_agreement", "top-1 agreement vs unquantized (higher is better)"),
)
COLUMNS = (
    ("size", "size"),
    ("kl", "KL vs fp"),
    ("top1", "top-1 agr."),
    ("ppl", "perplexity"),
    ("acc", "mean acc."),
    ("tps", "decode tok/s"),
    ("ttft", "TTFT ms"),
    ("usd", "$ / M tokens"),
    ("est_tps", "est. tok/s"),
    ("gates", "gates"),
)


def _number(value: float | None) -> str:
    """Format a figure with three significant digits and no exponent for large values."""
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count else "–"


def card_row(variant: VariantOutcome) -> dict[str, str]:
    """Return the variant's report-card cells as text."""
    m = variant.metrics
    passed = sum(1 for gate in variant.gates if gate.get("outcome") == "pass")
    return {
        "size": _megabytes(variant.size_bytes),
        "kl": _number(m.get("kl_mean")),
        "top1": _number(m.get("top1_agreement")),
        "ppl": _number(m.get("perplexity")),
        "acc": _number(m.get("accuracy_mean")),
        "tps": _number(m.get("decode_tps")),
        "ttft": _number(m.get("ttft_ms")),
        "usd": _number(variant.usd_per_million_tokens),
        "est_tps": _number(variant.estimated_tokens_per_second),
        "gates": "error" if variant.error else f"{passed}/{len(variant.gates)}",
    }


def report_document(result: PipelineResult) -> dict[str, Any]:
    """Return the JSON report: the whole result plus when it was written."""
    return {"generated_at": now_iso(), **result.to_dict()}


def render_markdown(result: PipelineResult) -> str:
    """Return the report card as Markdown."""
    plan = result.plan
    lines = [
        f"# Pipeline report: {plan.source.name} on {plan.profile.name}",
        "",
        f"Suite `{plan.suite}`, selection rule `{plan.select}`. "
        + (f"Selected: **{result.selected}**." if result.selected else "No variant passed every gate."),
        "",
        "| variant | " + " | ".join(title for _, title in COLUMNS) + " | passed |",
        "|---|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for variant in result.variants:
        row = card_row(variant)
        mark = "yes" if variant.passed else "no"
        name = f"**{variant.name}**" if variant.name == result.selected else variant.name
        lines.append(f"| {name} | " + " | ".join(row[key] for key, _ in COLUMNS) + f" | {mark} |")

    failing = [variant for variant in result.variants if not variant.passed]
    if failing:
        lines += ["", "## Missed gates", ""]
        for variant in failing:
            lines.append(f"- {variant.name}: " + "; ".join(variant.missed_gates()))
    lines += ["", "## Steps", ""]
    for step in result.steps:
        lines.append(f"- {step.step}: {step.status}, {step.duration_s:.1f} s")
    lines += ["", f"Total {result.duration_s:.1f} s. Sizes are artifact folders; decode tok/s and TTFT were "
              "measured on this machine; dollars and est. tok/s are the cost model's estimates for "
              f"{plan.profile.hardware.name}.", ""]
    return "\n".join(lines)


def quality_axis(variants: list[VariantOutcome]) -> tuple[str, str] | None:
    """Return the figure and the axis label the chart plots as quality, or None when no variant has one."""
    for figure, label in QUALITY_FIGURES:
        if any(variant.metrics.get(figure) is not None for variant in variants):
            return figure, label
    return None


def render_chart(result: PipelineResult) -> bytes:
    """Draw quality against size and against decode tokens/s, one point per variant, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    size_axes, speed_axes = figure.subplots(1, 2, sharey=True)
    axis = quality_axis(result.variants)
    figure_name, label = axis if axis else ("", "no quality metric measured")

    for variant in result.variants:
        quality = variant.metrics.get(figure_name) if axis else None
        if quality is None:
            continue
        colour = "#1a7f37" if variant.passed else "#cf222e"
        marker = "*" if variant.name == result.selected else "o"
        points = [(size_axes, variant.size_bytes / 1e6), (speed_axes, variant.metrics.get("decode_tps"))]
        for axes, x in points:
            if x is None or not x:
                continue
            axes.scatter([x], [quality], c=colour, marker=marker, s=140 if marker == "*" else 60, zorder=3)
            axes.annotate(variant.name, (x, quality), textcoords="offset points", xytext=(6, 6), fontsize=9)

    size_axes.set_xlabel("artifact size (MB)")
    speed_axes.set_xlabel("decode tokens/s (measured here)")
    size_axes.set_ylabel(label)
    for axes in (size_axes, speed_axes):
        axes.grid(True, alpha=0.3)
    figure.suptitle("Quality against size and speed (green: passed every gate, star: selected)", fontsize=11)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr.passed td:last-child { color: #1a7f37; font-weight: bold; }
tr.failed td:last-child { color: #cf222e; font-weight: bold; }
tr.selected td:first-child { font-weight: bold; }
img { max-width: 100%; }
"""


def render_html(result: PipelineResult, chart_png: bytes) -> str:
    """Return the report card as a self-contained HTML page with the chart embedded."""
    plan = result.plan
    escape = html.escape
    header = "".join(f"<th>{escape(title)}</th>" for _, title in COLUMNS)
    rows = []
    for variant in result.variants:
        row = card_row(variant)
        classes = ["passed" if variant.passed else "failed"]
        if variant.name == result.selected:
            classes.append("selected")
        cells = "".join(f"<td>{escape(row[key])}</td>" for key, _ in COLUMNS)
        verdict = "passed" if variant.passed else "failed"
        rows.append(
            f'<tr class="{" ".join(classes)}" data-variant="{escape(variant.name)}">'
            f"<td>{escape(variant.name)}</td>{cells}<td>{verdict}</td></tr>"
        )
    missed = "".join(
        f"<li><b>{escape(v.name)}</b>: {escape('; '.join(v.missed_gates()))}</li>"
        for v in result.variants if not v.passed
    )
    selected = (
        f"Selected: <b id=\"selected\">{escape(result.selected)}</b>" if result.selected
        else '<b id="selected">No variant passed every gate.</b>'
    )
    image = base64.b64encode(chart_png).decode("ascii")
    # The onload handler records that the browser decoded the image, which a headless-browser
    # test reads back from the DOM.
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Pipeline report: {escape(plan.source.name)} on {escape(plan.profile.name)}</title>
<style>{HTML_STYLE}</style>
</head>
<body>
<h1>Pipeline report: {escape(plan.source.name)} on {escape(plan.profile.name)}</h1>
<p>Suite <code>{escape(plan.suite)}</code>, selection rule <code>{escape(plan.select)}</code>. {selected}</p>
<table id="report-card">
<thead><tr><th>variant</th>{header}<th>result</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
{f"<h2>Missed gates</h2><ul>{missed}</ul>" if missed else ""}
<figure>
<img id="{CHART_ID}" alt="quality against size and decode speed" src="data:image/png;base64,{image}"
 onload="this.dataset.rendered = String(this.naturalWidth)">
</figure>
<p>Sizes are artifact folders; decode tok/s and TTFT were measured on this machine; dollars and
est. tok/s are the cost model's estimates for {escape(plan.profile.hardware.name)}.</p>
</body>
</html>
"""


def _write_text(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def write_reports(result: PipelineResult) -> dict[str, Path]:
    """Write the JSON, Markdown and HTML report into the pipeline folder and return their paths."""
    out = result.plan.out
    paths = {kind: out / name for kind, name in REPORT_NAMES.items()}
    result.reports = paths
    _write_text(paths["json"], json.dumps(report_document(result), indent=2, default=str) + "\n")
    _write_text(paths["markdown"], render_markdown(result))
    _write_text(paths["html"], render_html(result, render_chart(result)))
    return paths
