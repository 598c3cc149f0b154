"""Timing and the two ceilings every figure is read against (memory bandwidth, matmul rate).

On CUDA: `triton.testing.do_bench` medians (events, warm-up, L2 flushed between runs) for
kernels, synchronised wall-clock for whole generations; on CPU (the rehearsal) the median of
wall-clock runs. Bandwidths count bytes as METHOD.md says: a device copy moves its bytes read
plus its bytes written; a host-to-device copy moves its bytes once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

GB = 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device, *, runs: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of `runs` synchronised calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def kernel_ms(fn: Callable[[], object], device: torch.device, *, cpu_runs: int = 3) -> float:
    """Median ms of one call: do_bench on CUDA (25 ms warm-up, 60 ms of runs), wall-clock on CPU."""
    if device.type != "cuda":
        return wall_ms(fn, device, runs=cpu_runs)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=60, return_mode="median"))


def graph_ms(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str | None]:
    """(median ms of `fn` replayed in a CUDA graph, None) or (None, why not). No L2 flush between
    replays, so a working set that fits in L2 looks faster than DRAM allows."""
    if device.type != "cuda":
        return None, "CUDA graphs need a GPU"
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")), None
    except Exception as exc:  # a call that synchronises cannot be captured: a finding, not a crash
        return None, f"capture failed: {type(exc).__name__}: {str(exc)[:160]}"


def alternating_seconds(run_a: Callable[[], object], run_b: Callable[[], object], device: torch.device, *,
                        pairs: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Seconds of `pairs` alternating synchronised calls of two competitors (order flips every
    pair, so both share the machine's drift)."""
    for _ in range(warmup):
        run_a()
        run_b()
    sync(device)
    a, b = [], []
    for i in range(pairs):
        order = [(run_a, a), (run_b, b)] if i % 2 == 0 else [(run_b, b), (run_a, a)]
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sync(device)
            sink.append(time.perf_counter() - start)
    return a, b


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """Device-memory bandwidth of a large copy, GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), device, cpu_runs=5)
    return 2 * src.nbytes / (ms / 1e3) / GB


def host_to_device_gbps(device: torch.device, nbytes: int) -> tuple[float, str]:
    """(GB/s, what was measured): pinned host memory to the GPU on CUDA; on CPU, the stand-in is a
    copy between two host buffers (bytes counted once, as a transfer)."""
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=device.type == "cuda").uniform_()
    dst = torch.empty(host.shape, dtype=host.dtype, device=device)
    if device.type == "cuda":
        ms = wall_ms(lambda: dst.copy_(host, non_blocking=True), device, runs=5)
        return host.nbytes / (ms / 1e3) / GB, "pinned host -> device"
    ms = wall_ms(lambda: dst.copy_(host), device, runs=5)
    return host.nbytes / (ms / 1e3) / GB, "host -> host copy (CPU stand-in for pinned host -> device)"


def matmul_tflops(device: torch.device, n: int) -> float:
    """bf16 n x n x n matmul rate on random data, TFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
    ms = kernel_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms / 1e3) / 1e12
