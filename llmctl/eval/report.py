"""Renderings of a results document: a terminal table, JUnit XML and Markdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from llmctl.eval.results import _write_atomically, write_json

ENV_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def format_value(value: float | None) -> str:
    """Format a metric value with about four significant digits; '-' when absent."""
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"


def _threshold_text(gate: dict[str, Any]) -> str:
    text = f"{gate['op']} {format_value(gate['threshold'])}"
    if gate.get("baseline") is not None:
        text += f" (baseline {format_value(gate['baseline'])})"
    return text


def _observed_text(gate: dict[str, Any]) -> str:
    observed = format_value(gate["observed"])
    return f"{observed} (Wilson 95% lower)" if gate["bound"] == "wilson_lower" and gate["observed"] is not None else observed


def metric_rows(document: dict[str, Any]) -> list[list[str]]:
    """Return one row per metric: task, metric, value ± stderr, samples, status."""
    rows = []
    for task in document["tasks"]:
        for name, entry in task["metrics"].items():
            value = format_value(entry["value"])
            if entry.get("stderr") is not None and entry["value"] is not None:
                value += f" ± {format_value(entry['stderr'])}"
            if entry.get("unit"):
                value += f" {entry['unit']}"
            status = "skipped: " + (task["reason"] or "") if task["status"] == "skipped" else ""
            if not status and entry["value"] is None:
                status = entry.get("reason") or "not measured"
            rows.append([task["name"], name, value, str(entry["samples"]), status])
    return rows


def terminal_tables(document: dict[str, Any]) -> list[Any]:
    """Build rich tables of the metrics and the gates, for the CLI to print."""
    from rich.table import Table

    metrics = Table("task", "metric", "value", "samples", "note", title=f"suite {document['suite']['name']}")
    for row in metric_rows(document):
        metrics.add_row(*row)
    tables = [metrics]
    if document["gates"]:
        gates = Table("gate", "observed", "threshold", "outcome", title="gates")
        styles = {"pass": "green", "fail": "bold red", "skipped": "yellow"}
        for gate in document["gates"]:
            outcome = gate["outcome"] + (f" ({gate['reason']})" if gate.get("reason") else "")
            gates.add_row(gate["expression"], _observed_text(gate), _threshold_text(gate),
                          f"[{styles[gate['outcome']]}]{outcome}[/]")
        tables.append(gates)
    return tables


def junit_xml(document: dict[str, Any]) -> str:
    """Render the gates as JUnit XML: one test case per gate, failures and skips marked."""
    gates = document["gates"]
    suite = ElementTree.Element(
        "testsuite",
        name=f"llmctl eval {document['suite']['name']}",
        tests=str(len(gates)),
        failures=str(sum(g["outcome"] == "fail" for g in gates)),
        skipped=str(sum(g["outcome"] == "skipped" for g in gates)),
        errors="0",
        time=f"{document['duration_s']:.3f}",
        timestamp=document["created_at"],
    )
    for gate in gates:
        case = ElementTree.SubElement(suite, "testcase", classname=f"llmctl.eval.{document['suite']['name']}",
                                      name=gate["expression"], time="0")
        detail = f"observed {_observed_text(gate)}, required {_threshold_text(gate)}"
        if gate["outcome"] == "fail":
            ElementTree.SubElement(case, "failure", message=detail, type="GateFailure").text = detail
        elif gate["outcome"] == "skipped":
            ElementTree.SubElement(case, "skipped", message=gate.get("reason") or "not measured")
        else:
            ElementTree.SubElement(case, "system-out").text = detail
    root = ElementTree.Element("testsuites", name="llmctl eval")
    root.append(suite)
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(document: dict[str, Any]) -> str:
    """Render the run as Markdown: a verdict line, the gates and the metrics."""
    failed = [g for g in document["gates"] if g["outcome"] == "fail"]
    verdict = "❌ failed" if failed else "✅ passed"
    target = document["target"]
    lines = [
        f"## llmctl eval: {verdict}",
        "",
        f"Model `{target['location']}` ({target['kind']}), suite `{document['suite']['name']}`, "
        f"profile `{document['profile']['name']}`, seed {document['seed']}.",
        "",
    ]
    if document["gates"]:
        lines += ["| gate | observed | threshold | outcome |", "| --- | --- | --- | --- |"]
        for gate in document["gates"]:
            outcome = gate["outcome"] + (f": {gate['reason']}" if gate.get("reason") else "")
            lines.append(f"| `{_cell(gate['expression'])}` | {_cell(_observed_text(gate))} | {_cell(_threshold_text(gate))} | {_cell(outcome)} |")
        lines.append("")
    lines += ["| task | metric | value | samples | note |", "| --- | --- | --- | --- | --- |"]
    for row in metric_rows(document):
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(document: dict[str, Any], *, json_path: Path | None, junit_path: Path | None, markdown_path: Path | None) -> None:
    """Write the requested files and append the Markdown to ``$GITHUB_STEP_SUMMARY`` when it is set."""
    if json_path is not None:
        write_json(json_path, document)
    if junit_path is not None:
        _write_atomically(junit_path, junit_xml(document))
    text = None
    if markdown_path is not None:
        text = markdown(document)
        _write_atomically(markdown_path, text)
    summary = os.environ.get(ENV_STEP_SUMMARY)
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write((text or markdown(document)) + "\n")
