"""The device's peak FLOP/s, the denominator of MFU."""

from __future__ import annotations

import time

import torch


def device_peak_flops(precision: str = "fp32") -> float | None:
    """None on CUDA (Composer's SpeedMonitor looks the card up in its table); on CPU, measured.

    CPUs have no spec-sheet number we can trust across machines, so time a large matmul in the
    dtype the model's matmuls run in (bf16 under amp_bf16), the best case for them, with the
    threads training will use.
    """
    if torch.cuda.is_available():
        return None
    return measure_matmul_flops(dtype=torch.bfloat16 if precision == "amp_bf16" else torch.float32)


def measure_matmul_flops(
    n: int = 2048, min_seconds: float = 1.0, dtype: torch.dtype = torch.float32
) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
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
