"""Cost-estimate decode speed against what ``llmctl serve`` measures, before and after calibration.

Steps, all in one run on this machine:

1. ``llmctl profiles detect`` writes a profile for the machine (measured bandwidth and fp32 peak).
2. ``llmctl cost-estimate ARTIFACT --profile detected.yaml --quant int4`` gives the uncalibrated
   single-stream decode tokens/s.
3. ``llmctl serve ARTIFACT`` runs on a free port on 127.0.0.1; one streaming chat request at a
   time is timed ``--repeats`` times (decode tokens/s = (completion tokens - 1) / time from the
   first to the last streamed chunk).
4. The even-numbered runs go into a measurement file for ``--calibrate``; the odd-numbered runs
   check the calibrated estimate, so it is not judged on the data it was fitted to.

Usage::

    .venv/bin/python bench/cost_calibration.py --artifact DIR [--repeats 8] [--output-tokens 128]

ARTIFACT is an int4 artifact that ``llmctl serve`` runs (for example the output of
``llmctl quantize ... --method int4``) and that carries the model's ``config.json``.
Targets: uncalibrated within +-35% of the measured median, calibrated within +-10%.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LLMCTL = [sys.executable, "-m", "llmctl"]
PROMPT = "Explain in a few sentences why the sky is blue, then list three everyday examples of light scattering."


def run_json(*args: str) -> dict:
    done = subprocess.run([*LLMCTL, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"llmctl serve exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llmctl serve did not become healthy within {timeout:.0f} s")


def time_one_stream(base: str, model: str, output_tokens: int) -> dict:
    """Stream one greedy chat completion and time its first and last chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": output_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600.0) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
    if usage is None or first is None or last is None or last <= first:
        raise SystemExit("the server's stream carried no usage or too few chunks to time")
    return {"ttft_ms": (first - started) * 1e3, "prompt_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "decode_tps": (usage["completion_tokens"] - 1) / (last - first)}


def measure_serve(artifact: Path, profile: Path, repeats: int, output_tokens: int) -> list[dict]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*LLMCTL, "serve", str(artifact), "--port", str(port), "--profile", str(profile)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(base, server)
        model = httpx.get(f"{base}/v1/models", timeout=10.0).json()["data"][0]["id"]
        time_one_stream(base, model, 8)  # warm-up: first-call allocations are not decode speed
        return [time_one_stream(base, model, output_tokens) for _ in range(repeats)]
    finally:
        server.terminate()
        server.wait(timeout=30)


def estimate_decode(artifact: Path, profile: Path, prompt: int, output: int, calibrate: Path | None = None) -> dict:
    args = [str(artifact), "--profile", str(profile), "--quant", "int4", "--prompt-tokens", str(prompt),
            "--output-tokens", str(output), "--concurrency", "1", "--json"]
    if calibrate is not None:
        args += ["--calibrate", str(calibrate)]
    return run_json("cost-estimate", *args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="int4 artifact folder that llmctl serve runs")
    parser.add_argument("--repeats", type=int, default=8, help="timed requests (half calibrate, half check)")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--profile", type=Path, help="use this profile instead of detecting one")
    args = parser.parse_args()
    if not (args.artifact / "config.json").is_file():
        raise SystemExit(f"{args.artifact}: no config.json; pass an artifact folder built by llmctl")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        profile = args.profile
        if profile is None:
            profile = folder / "detected.yaml"
            subprocess.run([*LLMCTL, "profiles", "detect", "-o", str(profile), "--name", "bench-detected"], check=True)
        profile_name = run_json("profiles", "show", str(profile), "--json")["name"]

        runs = measure_serve(args.artifact, profile, max(2, args.repeats), args.output_tokens)
        fit, check = runs[0::2], runs[1::2]
        prompt = runs[0]["prompt_tokens"]
        output = round(statistics.median(r["output_tokens"] for r in runs))
        measured_fit = statistics.median(r["decode_tps"] for r in fit)
        measured_check = statistics.median(r["decode_tps"] for r in check)

        measurement = folder / "serve-speed.json"
        measurement.write_text(json.dumps({
            "profile": profile_name, "model": str(args.artifact),
            "speed": {"decode_tps": measured_fit, "ttft_ms": statistics.median(r["ttft_ms"] for r in fit),
                      "prompt_tokens": prompt, "output_tokens": output},
        }), encoding="utf-8")
        before = estimate_decode(args.artifact, profile, prompt, output)
        after = estimate_decode(args.artifact, profile, prompt, output, calibrate=measurement)

    row_before = next(r for r in before["rows"] if r["profile"] == profile_name)
    row_after = next(r for r in after["rows"] if r["profile"] == profile_name)
    estimated_before = row_before["tokens_per_second_per_stream"]
    estimated_after = row_after["tokens_per_second_per_stream"]
    error_before = estimated_before / measured_check - 1
    error_after = estimated_after / measured_check - 1
    print(f"artifact: {args.artifact}   profile: {profile_name}   prompt {prompt} + output {output} tokens, 1 stream")
    speeds = ", ".join(f"{run['decode_tps']:.1f}" for run in runs)
    print(f"serve decode tokens/s, runs: {speeds}")
    print(f"{'':28}{'tokens/s':>10}{'vs measured':>14}{'target':>10}")
    print(f"{'measured (check runs)':28}{measured_check:10.1f}{'':>14}")
    print(f"{'estimate, uncalibrated':28}{estimated_before:10.1f}{error_before:+14.1%}{'+-35%':>10}")
    print(f"{'estimate, calibrated':28}{estimated_after:10.1f}{error_after:+14.1%}{'+-10%':>10}")
    return 0 if abs(error_before) <= 0.35 and abs(error_after) <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
