"""Benchmark of ``llmctl pipeline run`` on SmolLM2-135M-Instruct with the default CPU profile.

Measures, in one run on this machine:
  1. a full pipeline of three variants (int4-b32, int8-dynamic, fp32) with the quick suite,
     starting from an empty output folder;
  2. a rerun with nothing changed, which should only read the cache (seconds);
and prints the report card the pipeline wrote.

Usage: .venv/bin/python bench/pipeline.py [--gguf PATH] [--out DIR] [--variants a,b,c] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_VARIANTS = "int4-b32,int8-dynamic,fp32"


def run_cli(gguf: Path, out: Path, variants: str) -> tuple[float, int, dict]:
    """Run the pipeline through the installed CLI and return wall seconds, exit code and its JSON."""
    command = [
        str(ROOT / ".venv" / "bin" / "llmctl"), "pipeline", "run", str(gguf), "-o", str(out),
        "--profile", "cpu-x86-avx2", "--variants", variants, "--json",
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode not in (0, 1):
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"pipeline failed with exit code {completed.returncode}")
    return elapsed, completed.returncode, json.loads(completed.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2 GGUF file")
    parser.add_argument("--out", type=Path, default=None, help="pipeline folder; default: a temporary one, removed after")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated variants of the default profile")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf} not found: run scripts/fetch-models.sh")

    temporary = args.out is None
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-pipeline-")) / "out"
    if out.exists():
        raise SystemExit(f"{out} exists: the first run must start from an empty folder")
    try:
        full_s, full_rc, full = run_cli(args.gguf, out, args.variants)
        rerun_s, rerun_rc, rerun = run_cli(args.gguf, out, args.variants)
        card = (out / "report.md").read_text(encoding="utf-8")
    finally:
        if temporary:
            shutil.rmtree(out.parent, ignore_errors=True)

    cached = sum(1 for step in rerun["steps"] if step["status"] == "cached")
    figures = {
        "model": args.gguf.name,
        "variants": args.variants.split(","),
        "full_run_s": round(full_s, 1),
        "full_run_exit_code": full_rc,
        "rerun_s": round(rerun_s, 2),
        "rerun_exit_code": rerun_rc,
        "rerun_cached_steps": f"{cached}/{len(rerun['steps'])}",
        "full_to_rerun_ratio": round(full_s / rerun_s, 1),
        "selected": full["selected"],
        "steps": {step["step"]: step["duration_s"] for step in full["steps"]},
    }
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| full pipeline, {len(figures['variants'])} variants, quick suite | {figures['full_run_s']} s |")
    print(f"| rerun with nothing changed | {figures['rerun_s']} s ({figures['rerun_cached_steps']} steps cached) |")
    print(f"| ratio | {figures['full_to_rerun_ratio']}x |")
    for step, seconds in figures["steps"].items():
        print(f"| step: {step} | {seconds} s |")
    print()
    print(card)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
