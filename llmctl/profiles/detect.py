"""Writing a profile for the machine llmctl runs on, with measured bandwidth and fp32 peak.

Cores, memory and ISA flags come from the operating system (``/proc/cpuinfo`` and
``/proc/meminfo`` on Linux, ``os`` and ``platform`` elsewhere). Memory bandwidth and the fp32
peak are measured with numpy in a few seconds: the best of several large array sums split
over all cores (reads, as decoding reads weights) and the best of several square matrix
products through numpy's BLAS.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.profiles.schema import Profile

logger = logging.getLogger(__name__)

# /proc/cpuinfo flag -> profile ISA feature. x86 uses "flags", arm64 "Features".
X86_FLAGS = {
    "sse4_2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
    "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni", "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
}
ARM_FLAGS = {"asimd": "neon", "asimddp": "asimddp", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm", "bf16": "bf16",
             "fphp": "fp16"}

BANDWIDTH_ARRAY_BYTES = 256 * 1024 * 1024  # well past any last-level cache
MATMUL_SIZE = 1024


@dataclass(frozen=True)
class Measurements:
    """Measurements taken by ``detect_profile``, in the units the profile uses."""

    read_bandwidth_gbps: float
    read_bandwidth_one_thread_gbps: float
    fp32_tflops: float
    seconds: float


def read_cpu_flags(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """Return the architecture and the profile ISA features of this CPU.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``; read from the system when None.
    """
    machine = platform.machine().lower()
    arch = "arm64" if machine in {"aarch64", "arm64"} else "x86_64"
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    match = re.search(r"^(flags|Features)\s*:\s*(.*)$", cpuinfo, flags=re.MULTILINE)
    if match:
        arch = "x86_64" if match.group(1) == "flags" else "arm64"
    flags = set(match.group(2).split()) if match else set()
    table = X86_FLAGS if arch == "x86_64" else ARM_FLAGS
    features = [feature for flag, feature in table.items() if flag in flags]
    if arch == "arm64" and "neon" not in features and machine in {"aarch64", "arm64"}:
        features.insert(0, "neon")  # Advanced SIMD is mandatory on AArch64
    return arch, sorted(set(features), key=features.index)


def read_cpu_model(cpuinfo: str | None = None) -> str:
    """Return the CPU's model name, or the platform's processor string."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine() or "unknown CPU")


def usable_cores() -> int:
    """Return the cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def total_memory_gb() -> float:
    """Return the machine's physical memory in GB (10^9 bytes)."""
    import psutil

    return psutil.virtual_memory().total / 1e9


def measure(threads: int, *, repeats: int = 5) -> Measurements:
    """Measure read bandwidth (all threads and one thread) and the fp32 matmul peak.

    Args:
        threads: worker threads for the bandwidth test; numpy releases the GIL in sums.
        repeats: runs of each test; the best is kept, since interference only slows a run.
    """
    import numpy as np

    started = time.perf_counter()
    data = np.ones(BANDWIDTH_ARRAY_BYTES // 8, dtype=np.float64)
    chunks = np.array_split(data, threads)

    def read_all(pool: ThreadPoolExecutor | None) -> float:
        begin = time.perf_counter()
        if pool is None:
            data.sum()
        else:
            list(pool.map(np.sum, chunks))
        return data.nbytes / (time.perf_counter() - begin) / 1e9

    with ThreadPoolExecutor(max_workers=threads) as pool:
        read_all(pool)  # touch every page once before timing
        parallel = max(read_all(pool) for _ in range(repeats))
    single = max(read_all(None) for _ in range(repeats))
    del data, chunks

    a = np.random.default_rng(0).standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - begin)
    tflops = 2 * MATMUL_SIZE**3 / best / 1e12
    return Measurements(parallel, single, tflops, time.perf_counter() - started)


def int8_speedup(isa: list[str]) -> float:
    """Return the int8 dot-product rate relative to fp32 FMA that the ISA allows.

    VNNI (x86) and sdot/i8mm (arm64) do four int8 multiply-adds per fp32 lane; plain AVX2
    needs two instructions (vpmaddubsw, vpmaddwd) for the same, so about twice fp32.
    """
    if {"avx512_vnni", "avx_vnni", "asimddp", "i8mm"} & set(isa):
        return 4.0
    if "avx2" in isa:
        return 2.0
    return 1.0


def detect_profile(name: str | None = None, *, repeats: int = 5) -> tuple[Profile, Measurements]:
    """Build a validated CPU profile for this machine.

    Args:
        name: the profile name; default ``detected-<host>``.
        repeats: runs of each measurement.

    Returns:
        The profile and the raw measurements.
    """
    from llmctl import __version__

    arch, isa = read_cpu_flags()
    cores = usable_cores()
    measured = measure(cores, repeats=repeats)
    host = re.sub(r"[^a-z0-9_.-]+", "-", socket.gethostname().lower()).strip("-.") or "host"
    name = name or f"detected-{host}"
    today = time.strftime("%Y-%m-%d")
    model = read_cpu_model()
    data: dict[str, Any] = {
        "name": name,
        "description": f"{model}, {cores} cores, measured by llmctl profiles detect on {today}.",
        "hardware": {
            "kind": "cpu", "name": model, "arch": arch, "isa": isa, "cores": cores,
            "memory_gb": round(total_memory_gb(), 2),
            "memory_bandwidth_gbps": round(measured.read_bandwidth_gbps, 2),
            "peak_tflops": {"fp32": round(measured.fp32_tflops, 4),
                            "int8": round(measured.fp32_tflops * int8_speedup(isa), 4)},
            "sources": [
                f"llmctl {__version__} profiles detect, {today}: read bandwidth best of {repeats} numpy sums of "
                f"{BANDWIDTH_ARRAY_BYTES // 2**20} MiB over {cores} threads "
                f"({measured.read_bandwidth_one_thread_gbps:.1f} GB/s on one thread)",
                f"fp32 peak: best of {repeats} numpy float32 {MATMUL_SIZE}x{MATMUL_SIZE} matmuls; "
                f"int8 peak not measured: {int8_speedup(isa):g} x fp32 from the ISA flags",
            ],
        },
        "runtime": {"execution_provider": "cpu", "threads": 0},
        "recipe": {"exporter": "auto", "dtype": "fp32",
                   "quantization": {"method": "int4", "block_size": 32, "symmetric": True, "accuracy_level": 4}},
        "workload": {"prompt_tokens": 512, "output_tokens": 128, "concurrency": 1, "kv_cache_dtype": "fp32"},
        "cost_model": {"prefill_efficiency": 0.3, "decode_efficiency": 0.6, "runtime_overhead_gb": 0.5,
                       "step_overhead_ms": 3.0},
    }
    logger.info("detected %s: %.1f GB/s read, %.3f TFLOPS fp32 in %.1f s", name,
                measured.read_bandwidth_gbps, measured.fp32_tflops, measured.seconds)
    return Profile.model_validate(data), measured

