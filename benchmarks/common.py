"""Shared measuring tools for the benchmarks: honest timing (warm-up excluded, median of
repeats), peak memory on CPU (resident set, reset between measurements) and on CUDA, the
machine's matrix-multiply peak measured in the same run, and a header naming hardware and
versions."""

from __future__ import annotations

import platform
import re
import statistics
import time

import torch


def describe_machine(device: str) -> str:
    import importlib.metadata as md

    def v(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name()
    else:
        hw = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
        hw += f", {torch.get_num_threads()} threads"
    return (f"device: {device} ({hw}); torch {torch.__version__}, diffusers {v('diffusers')}, "
            f"transformers {v('transformers')}, minidiff {v('minidiff')}, python {platform.python_version()}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_median_times(fns: dict, device: str, warmup: int = 1, repeats: int = 3) -> dict:
    """Median wall time (s) of each callable, timed in turns (a, b, a, b, ...) so that a change in
    machine load during the run affects both sides alike; warm-up calls are excluded."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_peak(fn, device: str) -> float:
    """Peak memory (MB) that one call of fn adds above what was in use before it."""
    base = reset_peak_memory(device)
    fn()
    sync(device)
    return peak_memory_mb(device, base)


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def reset_peak_memory(device: str) -> float:
    """Start a peak-memory measurement; returns the memory in use now (MB), the baseline."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    # Writing "5" to clear_refs resets the kernel's high-water mark of resident memory (VmHWM).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_memory_mb(device: str, baseline: float = 0.0) -> float:
    """Peak memory since `reset_peak_memory` above its baseline: what the measured work itself
    added (activations and workspaces), excluding weights that were already resident.
    CUDA: torch's max_memory_allocated; CPU: the process's peak resident set size (VmHWM)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20 - baseline
    return _status_mb("VmHWM") - baseline


def matmul_peak_gflops(device: str, dtype: torch.dtype, n: int = 2048) -> float:
    """Achieved GFLOP/s of an n x n x n matrix multiply: the practical ceiling of this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / t / 1e9


def count_flops(fn) -> int:
    """Floating-point operations of one call of fn (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
