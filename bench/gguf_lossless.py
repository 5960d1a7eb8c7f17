"""Compare a GGUF file transcoded with its own blocks against dequantize-then-requantize.

For each GGUF model it builds, side by side in one run:

- ``transcoded``: ``llmctl convert MODEL.gguf`` (the file's quantized blocks in MatMulNBits);
- ``transcoded-head-l4``: the same blocks, with the output head's MatMulNBits at accuracy
  level 4 (its input quantized to int8 blocks: faster, no longer exact);
- ``fp32``: ``llmctl convert MODEL.gguf --dtype fp32`` (the dequantized weights: the GGUF's own quality);
- ``requantized-int4``: the fp32 artifact quantized with ``llmctl quantize`` int4 (symmetric, block 32).

and reports WikiText-2 perplexity on a fixed slice of the test split (scored with the GenAI
runtime, one forward pass per window), artifact folder size against the GGUF file, and greedy
decode tokens/s (median of several runs).

    .venv/bin/python bench/gguf_lossless.py                      # SmolLM2-135M Q4_1
    .venv/bin/python bench/gguf_lossless.py --gemma              # also Gemma-3-270M Q4_K_M
    .venv/bin/python bench/gguf_lossless.py --tokens 2048 --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "smollm2": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "max_size_ratio": 1.10},
    "gemma3": {"file": "gemma-3-270m-q4_k_m.gguf", "max_size_ratio": 1.15},
}
WIKITEXT = ROOT.parent / "shared" / "datasets" / "wikitext2" / "test.raw.txt"
DECODE_PROMPT = "The history of the city begins"
PERPLEXITY_TOLERANCE = 0.005  # transcoded within 0.5% of the dequantized fp32 model


def build_artifacts(gguf_path: Path, workdir: Path) -> dict[str, Path]:
    """Build the four artifacts from the GGUF file and return their folders by name."""
    from llmctl.convert import convert
    from llmctl.gguf.transcode import transcode
    from llmctl.profiles.loader import load_profile
    from llmctl.quantize import quantize

    profile = load_profile(None)
    folders = {}
    started = time.perf_counter()
    folders["transcoded"] = convert(str(gguf_path), workdir / "transcoded", profile=profile, validate=False).path
    print(f"  transcoded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    folders["fp32"] = convert(str(gguf_path), workdir / "fp32", profile=profile, dtype="fp32", exporter="genai", validate=False).path
    head_level4 = workdir / "transcoded-head-l4"
    shutil.copytree(folders["fp32"], head_level4)
    transcode(head_level4, gguf_path, head_accuracy_level=4)
    folders["transcoded-head-l4"] = head_level4
    folders["requantized-int4"] = quantize(
        folders["fp32"], workdir / "int4", profile=profile, method="int4", block_size=32, symmetric=True, validate=False
    ).path
    return folders


def wikitext_windows(folder: Path, tokens: int, window: int) -> list[list[int]]:
    """Tokenize the start of the WikiText-2 test split and cut it into fixed windows.

    Each window starts with the BOS token when the model has one, as in training: Gemma-3
    without it scores a perplexity in the hundreds. The BOS position itself is never scored.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = WIKITEXT.read_text(encoding="utf-8")[: tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = window - len(prefix)
    return [prefix + ids[start : start + step] for start in range(0, len(ids) - step + 1, step)]


def perplexity(folder: Path, windows: list[list[int]]) -> float:
    """Return exp(mean next-token negative log-likelihood) over the windows, scored with GenAI."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    total, count = 0.0, 0
    for window in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(window, dtype=np.int32))
        logits = np.array(generator.get_output("logits"), dtype=np.float64)[0]
        shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.array(window[1:])
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
        del generator
    return math.exp(total / count)


def decode_tokens_per_s(folders: dict[str, Path], new_tokens: int, repeats: int) -> dict[str, float]:
    """Return each artifact's median greedy decode speed (tokens after the first, per second).

    The artifacts take turns, one run each per round, so that a change in machine load
    during the benchmark affects them alike.
    """
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    # NOTE: og.Tokenizer (onnxruntime-genai 0.12.2) cannot parse the tokenizer files of the
    # Gemma-3 artifacts ("type must be object, but is array"), so transformers encodes.
    prompt = AutoTokenizer.from_pretrained(next(iter(folders.values())))(DECODE_PROMPT)["input_ids"]
    prompt = np.array(prompt, dtype=np.int32)
    models = {label: og.Model(str(folder)) for label, folder in folders.items()}
    speeds: dict[str, list[float]] = {label: [] for label in folders}
    for _ in range(repeats):
        for label, model in models.items():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            generator.generate_next_token()
            started, produced = time.perf_counter(), 0
            while not generator.is_done():
                generator.generate_next_token()
                produced += 1
            speeds[label].append(produced / (time.perf_counter() - started))
            del generator
    return {label: statistics.median(values) for label, values in speeds.items()}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_model(name: str, gguf_path: Path, args: argparse.Namespace) -> dict:
    print(f"{name}: building artifacts from {gguf_path.name}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"gguf-bench-{name}-") as scratch:
        folders = build_artifacts(gguf_path, Path(scratch))
        windows = wikitext_windows(folders["fp32"], args.tokens, args.window)
        gguf_bytes = gguf_path.stat().st_size
        rows = {}
        for label, folder in folders.items():
            print(f"  scoring {label}", file=sys.stderr)
            rows[label] = {
                "perplexity": perplexity(folder, windows),
                "folder_bytes": folder_bytes(folder),
                "size_vs_gguf": folder_bytes(folder) / gguf_bytes,
            }
        print("  timing decode", file=sys.stderr)
        for label, speed in decode_tokens_per_s(folders, args.new_tokens, args.repeats).items():
            rows[label]["decode_tokens_per_s"] = speed
    reference = rows["fp32"]["perplexity"]
    for row in rows.values():
        row["perplexity_vs_fp32"] = row["perplexity"] / reference - 1
    checks = {
        "perplexity_within_0.5pct": abs(rows["transcoded"]["perplexity_vs_fp32"]) <= PERPLEXITY_TOLERANCE,
        "size_within_limit": rows["transcoded"]["size_vs_gguf"] <= MODELS[name]["max_size_ratio"],
    }
    return {
        "gguf": gguf_path.name, "gguf_bytes": gguf_bytes, "tokens_scored": sum(len(w) - 1 for w in windows),
        "max_size_ratio": MODELS[name]["max_size_ratio"], "artifacts": rows, "checks": checks,
    }


def print_table(results: dict) -> None:
    print(f"load average at the end (1, 5, 15 min): {', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print(f"{'model':8} {'artifact':19} {'perplexity':>10} {'vs fp32':>8} {'MB':>8} {'x GGUF':>7} {'tok/s':>7}")
    for name, result in results.items():
        for label, row in result["artifacts"].items():
            print(
                f"{name:8} {label:19} {row['perplexity']:10.3f} {row['perplexity_vs_fp32']:+8.2%} "
                f"{row['folder_bytes'] / 1e6:8.1f} {row['size_vs_gguf']:7.2f} {row['decode_tokens_per_s']:7.1f}"
            )
        print(f"{name:8} checks: {result['checks']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemma", action="store_true", help="also run Gemma-3-270M Q4_K_M")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models")
    parser.add_argument("--tokens", type=int, default=1024, help="WikiText-2 tokens scored (default 1024)")
    parser.add_argument("--window", type=int, default=512, help="tokens per scoring window (default 512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=5, help="decode runs per artifact; the median is reported")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    if not WIKITEXT.is_file():
        print(f"WikiText-2 not found at {WIKITEXT}", file=sys.stderr)
        return 2
    names = ["smollm2"] + (["gemma3"] if args.gemma else [])
    results = {}
    for name in names:
        gguf_path = args.models_dir / MODELS[name]["file"]
        if not gguf_path.is_file():
            print(f"{gguf_path} not found: run scripts/fetch-models.sh{' --gemma' if name == 'gemma3' else ''}", file=sys.stderr)
            return 2
        results[name] = run_model(name, gguf_path, args)
        print_table({name: results[name]})

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if all(all(result["checks"].values()) for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
