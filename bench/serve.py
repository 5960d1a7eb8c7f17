"""Throughput and latency of ``llmctl serve`` against the plain GenAI loop and the PyTorch backend.

Runs side by side in one invocation, on the same model file and prompt:

- ``plain-loop``: onnxruntime_genai's own Generator loop in this process (from bench/runtime.py);
- ``serve``: ``llmctl serve`` on the artifact, one stream read by a streaming HTTP client;
- ``serve x8``: eight concurrent streams against the same server;
- ``torch``, ``torch x8``: the same two measurements against ``llmctl serve --backend torch``
  (with ``--torch-model``), the baseline users would otherwise run.

Every stream is greedy with EOS ignored, so it generates exactly ``--tokens`` tokens after a
prompt of exactly ``--prompt-tokens`` tokens. Decode tokens/s counts the tokens after the
first one over the time after the first one; time to first token (TTFT) is reported apart.
Aggregate tokens/s of N streams is all their tokens over the wall time from the first request
to the last token. Rounds alternate between the paths so drift hits them alike; medians.
Peak resident memory (RSS) of each server process is sampled every 50 ms.

Usage:
    .venv/bin/python bench/serve.py ARTIFACT_DIR [--torch-model HF_DIR_OR_GGUF] [--tokens 128]
        [--prompt-tokens 100] [--streams 8] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The history of Paris spans more than two thousand years, from a small settlement of the Parisii on an "
    "island in the Seine to one of the largest cities in Europe. Over the centuries it became a centre of "
    "learning, trade, art and government, and its streets, bridges and monuments tell that story. "
) * 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``llmctl serve`` in a subprocess, with its peak RSS sampled in a thread."""

    def __init__(self, model: Path, backend: str, streams: int) -> None:
        import psutil

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "llmctl", "serve", str(model), "--backend", backend, "--port", str(self.port),
            "--served-model-name", "bench", "--max-concurrency", str(streams),
        ]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.peak_rss = 0
        self._watch = psutil.Process(self.process.pid)
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        self._wait_healthy()

    def current_rss(self) -> int:
        """Return the server's resident memory now, in bytes."""
        return self._watch.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self._watch.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process has exited
                return
            time.sleep(0.05)

    def _wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {self.process.stderr.read() if self.process.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become healthy")

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        self.process.wait(timeout=60)


def prompt_ids(server: ServerProcess, count: int) -> list[int]:
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "bench", "prompt": TEXT}).json()["tokens"]
    if len(tokens) < count:
        raise SystemExit(f"the benchmark text has only {len(tokens)} tokens; lower --prompt-tokens")
    return tokens[:count]


def one_stream(url: str, prompt: list[int], tokens: int) -> tuple[float, float, float, int]:
    """Stream one completion; return (start, first token time, last token time, tokens)."""
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    generated = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            elif event.get("choices"):
                last = time.perf_counter()
                first = first or last
    return started, first or started, last or started, generated


def single(url: str, prompt: list[int], tokens: int) -> dict[str, float]:
    started, first, last, generated = one_stream(url, prompt, tokens)
    return {"ttft_s": first - started, "decode_tps": (generated - 1) / (last - first), "tps": generated / (last - started)}


def concurrent_streams(url: str, prompt: list[int], tokens: int, streams: int) -> dict[str, float]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(lambda _: one_stream(url, prompt, tokens), range(streams)))
    begin = min(r[0] for r in results)
    end = max(r[2] for r in results)
    return {"aggregate_tps": sum(r[3] for r in results) / (end - begin), "ttft_s": statistics.median(r[1] - r[0] for r in results)}


def load_plain_loop(model: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_runtime", REPO_ROOT / "bench" / "runtime.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.plain_loop(model, 0)


def torch_folder(source: Path, scratch: Path) -> Path:
    """Return a Hugging Face folder for the torch backend; a .gguf file is dequantized into one."""
    if source.is_dir():
        return source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = scratch / "torch-model"
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # save_pretrained copies the whole GGUF as tokenizer.model; tokenizer.json is all that is needed.
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure_server(model: Path, backend: str, args: argparse.Namespace, plain=None) -> dict:  # type: ignore[no-untyped-def]
    server = ServerProcess(model, backend, args.streams)
    try:
        prompt = prompt_ids(server, args.prompt_tokens)
        single(server.url, prompt, 8)  # warm-up
        rounds: dict[str, list[dict[str, float]]] = {"single": [], "concurrent": [], "plain": []}
        for _ in range(args.rounds):
            if plain is not None:
                ttft, tps = plain(prompt, args.tokens)
                rounds["plain"].append({"ttft_s": ttft, "decode_tps": tps})
            rounds["single"].append(single(server.url, prompt, args.tokens))
            rounds["concurrent"].append(concurrent_streams(server.url, prompt, args.tokens, args.streams))
    finally:
        server.stop()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[kind])

    result = {
        "decode_tps": median("single", "decode_tps"),
        "ttft_ms": median("single", "ttft_s") * 1000,
        "single_tps": median("single", "tps"),
        "aggregate_tps": median("concurrent", "aggregate_tps"),
        "concurrent_ttft_ms": median("concurrent", "ttft_s") * 1000,
        "peak_rss_bytes": server.peak_rss,
        "artifact_bytes": folder_bytes(model),
    }
    result["concurrency_speedup"] = result["aggregate_tps"] / result["single_tps"]
    if plain is not None:
        result["plain_decode_tps"] = median("plain", "decode_tps")
        result["plain_ttft_ms"] = median("plain", "ttft_s") * 1000
        result["decode_vs_plain"] = result["decode_tps"] / result["plain_decode_tps"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="artifact folder with genai_config.json (SmolLM2-135M-Instruct int4)")
    parser.add_argument("--torch-model", type=Path, help="Hugging Face folder or .gguf file for the PyTorch baseline")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every measurement once")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    os.environ.setdefault("LLMCTL_LOG_LEVEL", "WARNING")
    plain = load_plain_loop(args.model)
    report = {
        "model": str(args.model), "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
        "streams": args.streams, "rounds": args.rounds,
        "genai": measure_server(args.model, "genai", args, plain),
    }
    del plain
    if args.torch_model is not None:
        with tempfile.TemporaryDirectory() as scratch:
            report["torch"] = measure_server(torch_folder(args.torch_model, Path(scratch)), "torch", args)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: prompt {args.prompt_tokens} tokens, {args.tokens} generated, {args.streams} streams, median of {args.rounds} rounds")
    genai = report["genai"]
    print(f"plain GenAI loop : decode {genai['plain_decode_tps']:.1f} tok/s, TTFT {genai['plain_ttft_ms']:.0f} ms")
    for name in ("genai", "torch"):
        if name not in report:
            continue
        r = report[name]
        print(
            f"serve {name:<6}: decode {r['decode_tps']:.1f} tok/s, TTFT {r['ttft_ms']:.0f} ms, "
            f"x{args.streams} aggregate {r['aggregate_tps']:.1f} tok/s ({r['concurrency_speedup']:.2f}x single), "
            f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, artifact {r['artifact_bytes'] / 1e6:.0f} MB"
        )
    print(f"serve decode vs plain loop: {genai['decode_vs_plain']:.2f}x (target >= 1.0); "
          f"concurrency speedup {genai['concurrency_speedup']:.2f}x (target >= 2.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
