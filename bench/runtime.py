"""Single-stream decode speed of llmctl's GenAI backend against the plain GenAI Python loop.

Runs, side by side on the same model file and prompt, interleaved round by round so that
machine drift hits every path alike:

- ``plain-loop``: onnxruntime_genai's own Generator loop, written as its examples write it;
- ``genai-backend``: ``GenAIBackend.generate`` without continuous batching (the CLI path);
- ``genai-engine``: ``GenAIBackend.generate`` through the continuous-batching engine (the server path);
- optionally ``ort-backend`` on the same file (``--with-ort``).

Greedy decoding with EOS ignored, so every path generates exactly ``--tokens`` tokens.
Decode tokens/s counts the tokens after the first one over the time after the first one;
time to first token is reported apart. Medians over ``--rounds`` rounds.

Usage:
    .venv/bin/python bench/runtime.py ARTIFACT_DIR [--tokens 128] [--rounds 5] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROMPT = "What is the capital of France? Answer in one sentence, then list three famous landmarks there."


def plain_loop(model_dir: Path, threads: int) -> Callable[[list[int], int], tuple[float, float]]:
    """Build the reference: a bare onnxruntime_genai Generator loop."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def run(prompt_ids: list[int], tokens: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        total = len(prompt_ids) + tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        started = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        first = None
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        del generator
        return first - started, (count - 1) / (end - first)

    return run


def backend_loop(backend) -> Callable[[list[int], int], tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Time ``backend.generate`` the way the server and the CLI consume it."""
    from llmctl.runtime.base import SamplingParams

    def run(prompt_ids: list[int], tokens: int) -> tuple[float, float]:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        first = None
        count = 0
        for _ in backend.generate(prompt_ids, params):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - started, (count - 1) / (end - first)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="artifact folder with genai_config.json")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every path once")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 lets the runtime choose")
    parser.add_argument("--with-ort", action="store_true", help="also time the ONNX Runtime backend on the same file")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    from llmctl.runtime import open_backend

    unbatched = open_backend(args.model, "genai", threads=args.threads, continuous_batching=False)
    batched = open_backend(args.model, "genai", threads=args.threads, continuous_batching=True)
    prompt_ids = unbatched.apply_chat_template([{"role": "user", "content": PROMPT}])
    backends = [unbatched, batched]
    paths = {
        "plain-loop": plain_loop(args.model, args.threads),
        "genai-backend": backend_loop(unbatched),
        "genai-engine": backend_loop(batched),
    }
    if args.with_ort:
        backends.append(open_backend(args.model, "ort", threads=args.threads))
        paths["ort-backend"] = backend_loop(backends[-1])

    for run in paths.values():  # warm-up: first runs allocate and tune
        run(prompt_ids, 8)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            samples[name].append(run(prompt_ids, args.tokens))

    # Release every GenAI object before exit, or GenAI reports them as leaked.
    paths.clear()
    for backend in backends:
        backend.close()
    gc.collect()

    reference = statistics.median(tps for _, tps in samples["plain-loop"])
    results = {
        name: {
            "decode_tokens_per_s": statistics.median(tps for _, tps in runs),
            "best_decode_tokens_per_s": max(tps for _, tps in runs),
            "time_to_first_token_ms": statistics.median(ttft for ttft, _ in runs) * 1000,
            "ratio_to_plain_loop": statistics.median(tps for _, tps in runs) / reference,
        }
        for name, runs in samples.items()
    }
    report = {"model": str(args.model), "prompt_tokens": len(prompt_ids), "tokens": args.tokens, "rounds": args.rounds, "results": results}

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: prompt {len(prompt_ids)} tokens, {args.tokens} generated, median of {args.rounds} rounds")
    print(f"{'path':<15} {'decode tok/s':>12} {'best':>8} {'TTFT ms':>8} {'vs plain':>9}")
    for name, row in results.items():
        print(
            f"{name:<15} {row['decode_tokens_per_s']:>12.1f} {row['best_decode_tokens_per_s']:>8.1f} "
            f"{row['time_to_first_token_ms']:>8.1f} {row['ratio_to_plain_loop']:>8.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
