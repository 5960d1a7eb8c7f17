"""Throughput of the batching engine alone, with no HTTP in the way: the gain batching can give here.

Runs in one process, on one artifact, side by side:

- one sequence, then ``--streams`` sequences submitted together from as many threads, each a
  ``--prompt-tokens`` prompt (a different slice of one text per stream) and ``--tokens``
  greedy tokens with EOS ignored;
- for each, the engine's own clock: time in decode steps and in prompt (prefill) calls.

It prints the aggregate tokens/s with and without prompt time, and the ratio of the N-stream
figures to the one-stream ones. ``bench/serve.py`` measures the same through the server; the
gap between the two is what HTTP costs. Medians over ``--rounds``.

Usage:
    .venv/bin/python bench/batching.py ARTIFACT_DIR [--tokens 128] [--prompt-tokens 100]
        [--streams 8] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time
from pathlib import Path

from llmctl.runtime import open_backend
from llmctl.runtime.base import SamplingParams

TEXT = (
    "The history of Paris spans more than two thousand years, from a small settlement of the Parisii on an "
    "island in the Seine to one of the largest cities in Europe. Over the centuries it became a centre of "
    "learning, trade, art and government, and its streets, bridges and monuments tell that story. "
) * 12


def run_streams(backend, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Generate from every prompt at once; return wall time, tokens and the engine's model time."""
    engine = backend._engine
    before = dataclasses.replace(engine.stats)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    counts: list[int] = [0] * len(prompts)

    def run(index: int) -> None:
        counts[index] = sum(1 for _ in backend.generate(prompts[index], params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = engine.stats
    return {
        "wall_s": wall,
        "tokens": sum(counts),
        "decode_s": after.decode_s - before.decode_s,
        "prefill_s": after.prefill_s - before.prefill_s,
        "decode_steps": after.decode_steps - before.decode_steps,
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "tps": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
        "tps_without_prompt": statistics.median(r["tokens"] / (r["wall_s"] - r["prefill_s"]) for r in runs),
        "decode_ms_per_step": statistics.median(1000 * r["decode_s"] / r["decode_steps"] for r in runs),
        "prefill_ms_per_prompt": statistics.median(1000 * r["prefill_s"] for r in runs) / max(1, runs[0]["streams"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="artifact folder made by the GenAI model builder (SmolLM2-135M-Instruct int4)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both measurements once")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    backend = open_backend(args.model, "genai")
    if backend._engine is None:
        raise SystemExit(f"{args.model}: this graph cannot be batched (no in-place KV cache); convert with --exporter genai")
    text_ids = backend.encode(TEXT)
    if len(text_ids) < args.prompt_tokens + args.streams * 7:
        raise SystemExit(f"the benchmark text has only {len(text_ids)} tokens; lower --prompt-tokens")
    prompts = [text_ids[7 * i : 7 * i + args.prompt_tokens] for i in range(args.streams)]
    run_streams(backend, prompts[:1], 8)  # warm-up

    single, batched = [], []
    for _ in range(args.rounds):
        single.append({**run_streams(backend, prompts[:1], args.tokens), "streams": 1})
        batched.append({**run_streams(backend, prompts, args.tokens), "streams": args.streams})
    backend.close()

    single_stream, all_streams = summarize(single), summarize(batched)
    result = {
        "model": str(args.model),
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "streams": args.streams,
        "single": single_stream,
        "batched": all_streams,
        "speedup": all_streams["tps"] / single_stream["tps"],
        "speedup_without_prompt": all_streams["tps_without_prompt"] / single_stream["tps_without_prompt"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: prompt {args.prompt_tokens} tokens, {args.tokens} generated, median of {args.rounds} rounds")
    for label, figures in (("1 stream ", single_stream), (f"{args.streams} streams", all_streams)):
        print(
            f"{label}: {figures['tps']:.1f} tok/s, {figures['tps_without_prompt']:.1f} tok/s without prompt time; "
            f"decode step {figures['decode_ms_per_step']:.1f} ms, prompt {figures['prefill_ms_per_prompt']:.0f} ms each"
        )
    print(f"speedup: {result['speedup']:.2f}x, {result['speedup_without_prompt']:.2f}x without prompt time")


if __name__ == "__main__":
    main()
