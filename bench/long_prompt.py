"""A long prompt beside short streams: latency and server memory of ``llmctl serve``.

One server, side by side in one run:

- ``long alone``: one request with a ``--long-tokens`` prompt and 20 generated tokens;
- ``short alone``: one request with a short prompt and 8 generated tokens;
- ``short during long``: the same short request sent while the long prompt is being read;
- ``long beside streams``: ``--streams`` short streams of 150 tokens, then the long request.

It reports each request's wall time, the server's peak RSS during the last scenario, and its
RSS a few seconds after everything has finished (memory the KV cache gave back).

Usage:
    .venv/bin/python bench/long_prompt.py ARTIFACT_DIR [--long-tokens 3000] [--streams 7] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import TEXT, ServerProcess  # noqa: E402  (bench/serve.py, run as a script)


def complete(url: str, prompt: list[int], tokens: int) -> float:
    """Send one non-streamed completion; return its wall time in seconds."""
    started = time.perf_counter()
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=900)
    response.raise_for_status()
    return time.perf_counter() - started


def long_prompt(server: ServerProcess, count: int) -> list[int]:
    text_ids = httpx.post(f"{server.url}/tokenize", json={"model": "bench", "prompt": TEXT}).json()["tokens"]
    return (text_ids * (count // len(text_ids) + 1))[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="artifact folder (SmolLM2-135M-Instruct int4)")
    parser.add_argument("--long-tokens", type=int, default=3000, help="tokens in the long prompt")
    parser.add_argument("--streams", type=int, default=7, help="short streams running beside the long request")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    server = ServerProcess(args.model, "auto", args.streams + 2)
    try:
        long_ids = long_prompt(server, args.long_tokens)
        short_ids = long_ids[:12]
        complete(server.url, short_ids, 2)  # warm-up
        result: dict[str, float] = {"long_tokens": args.long_tokens, "streams": args.streams}
        result["long_alone_s"] = complete(server.url, long_ids, 20)
        result["short_alone_s"] = complete(server.url, short_ids, 8)

        with concurrent.futures.ThreadPoolExecutor(max_workers=args.streams + 1) as pool:
            long_future = pool.submit(complete, server.url, long_ids, 20)
            time.sleep(0.5)  # the long prompt is being read
            result["short_during_long_s"] = complete(server.url, short_ids, 8)
            long_future.result()

            baseline = server.current_rss()
            server.peak_rss = 0
            started = time.perf_counter()
            streams = [pool.submit(complete, server.url, short_ids, 150) for _ in range(args.streams)]
            time.sleep(0.5)
            result["long_beside_streams_s"] = complete(server.url, long_ids, 20)
            for stream in streams:
                stream.result()
            result["streams_done_s"] = time.perf_counter() - started
        result["rss_before_mb"] = baseline / 2**20
        result["rss_peak_mb"] = server.peak_rss / 2**20
        time.sleep(3)
        result["rss_after_mb"] = server.current_rss() / 2**20
    finally:
        server.stop()

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: {args.long_tokens}-token prompt, {args.streams} short streams")
    print(f"long alone {result['long_alone_s']:.1f} s, short alone {result['short_alone_s']:.2f} s, "
          f"short during the long prompt {result['short_during_long_s']:.2f} s")
    print(f"long beside {args.streams} streams {result['long_beside_streams_s']:.1f} s (streams done at "
          f"{result['streams_done_s']:.1f} s); server RSS {result['rss_before_mb']:.0f} MB before, "
          f"{result['rss_peak_mb']:.0f} MB peak, {result['rss_after_mb']:.0f} MB 3 s after")


if __name__ == "__main__":
    main()
