"""Benchmark convert + int4 quantize on the real models and print a markdown table.

    .venv/bin/python bench/convert_quantize.py [--gemma] [--models DIR]

Checks, side by side in one run: SmolLM2-135M-Instruct (from its GGUF file) convert + int4
wall time (target <= 60 s), int4 folder size (<= 90 MB) and a greedy answer that says Paris;
Gemma-3-270M int4 folder size (<= 300 MB); and fp32 ONNX weight bytes within 5% of the
checkpoint's fp32 parameter bytes. Run it alone on the machine: timings move with load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_model(gguf: Path, workdir: Path, question: str | None) -> dict:
    from llmctl.convert import convert
    from llmctl.profiles import load_profile
    from llmctl.quantize import quantize
    from tests.test_realmodel_convert import greedy_answer

    profile = load_profile(None)
    started = time.perf_counter()
    converted = convert(str(gguf), workdir / "onnx", profile=profile, dtype="fp32")
    convert_s = time.perf_counter() - started
    quantized = quantize(converted.path, workdir / "int4", profile=profile, method="int4")
    total_s = time.perf_counter() - started
    sizes = converted.summary["sizes"]
    row = {
        "model": gguf.stem,
        "convert_s": convert_s,
        "convert_int4_s": total_s,
        "int4_folder_mb": quantized.summary["sizes"]["after_folder_bytes"] / 1e6,
        "fp32_weight_ratio": sizes["onnx_weight_bytes"] / sizes["checkpoint_fp32_bytes"],
        "convert_top1": converted.summary["parity"]["top1_agreement"],
        "int4_top1": quantized.summary["parity"]["top1_agreement"],
        "answer": greedy_answer(quantized.path, question) if question else "",
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / ".models")
    parser.add_argument("--gemma", action="store_true", help="also run Gemma-3-270M (about 5 minutes more)")
    args = parser.parse_args()

    jobs = [(args.models / "SmolLM2-135M-Instruct.Q4_1.gguf", "What is the capital of France?", 60, 90)]
    if args.gemma:
        jobs.append((args.models / "gemma-3-270m-q4_k_m.gguf", None, None, 300))

    rows = []
    for gguf, question, time_target, size_target in jobs:
        with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as scratch:
            row = run_model(gguf, Path(scratch), question)
        checks = [abs(row["fp32_weight_ratio"] - 1) <= 0.05, row["int4_folder_mb"] <= size_target]
        if time_target:
            checks.append(row["convert_int4_s"] <= time_target)
        if question:
            checks.append("Paris" in row["answer"])
        row["pass"] = all(checks)
        rows.append(row)

    print("| model | convert s | convert + int4 s | int4 folder MB | fp32 weights / checkpoint | top-1 convert | top-1 int4 | answer | pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['convert_s']:.1f} | {r['convert_int4_s']:.1f} | {r['int4_folder_mb']:.1f} | "
            f"{r['fp32_weight_ratio']:.3f} | {r['convert_top1']:.3f} | {r['int4_top1']:.3f} | {r['answer'][:40]!r} | {r['pass']} |"
        )


if __name__ == "__main__":
    main()
