"""The device's peak FLOP/s, the denominator of MFU."""

from __future__ import annotations

import time

import torch


def device_peak_flops() -> float | None:
    """None on CUDA (Composer's SpeedMonitor looks the card up in its table); on CPU, measured.

    CPUs have no spec-sheet number we can trust across machines, so time a large fp32 matmul, the
    best case for the model's own matmuls, with the threads training will use.
    """
    if torch.cuda.is_available():
        return None
    return measure_matmul_flops()


def measure_matmul_flops(n: int = 2048, min_seconds: float = 1.0) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and caches
    best = 0.0
    spent = 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * n**3 / elapsed)
    return best
