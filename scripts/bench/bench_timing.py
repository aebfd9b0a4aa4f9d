"""Side-by-side timing: peers measured interleaved in one process, median and spread reported.

CPU timings on a shared machine drift while other processes run; timing peers round-robin (order
rotated every repetition) exposes each to the same drift, so their ratio is steadier than either
time. Report the median and the min-max range of every measurement.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from dbrx_train.training.cpu import native_bf16_matmul
from dbrx_train.training.peak_flops import measure_matmul_flops


class Timing(NamedTuple):
    median: float
    low: float
    high: float
    samples: tuple[float, ...] = ()  # one per repetition, in repetition order

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree."""
        return (self.high - self.low) / self.median


# What `interleaved` reads. "wall" (perf_counter) is what a user waits for. "cpu" (this process's CPU
# time) leaves out the time other processes hold the cores: on a loaded machine with 1 thread it
# measures the work itself (with 2+ threads it would also count OpenMP's spinning).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # run.py --clock sets it for the whole run


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Seconds per call of each fn, measured round-robin; each fn runs `warmup` untimed calls first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
    return {name: Timing(statistics.median(s), min(s), max(s), tuple(s)) for name, s in samples.items()}


def paired_ratio(numerator: Timing, denominator: Timing) -> Timing:
    """numerator / denominator per repetition (the two ran in the same round, minutes apart at most),
    so load that changes between rounds cancels; median and min-max over the rounds."""
    ratios = [a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)]
    return Timing(statistics.median(ratios), min(ratios), max(ratios), tuple(ratios))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(threads: int) -> str:
    """What ran the numbers; the load average says how much else was running (other processes)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    bf16 = "native bf16 matmul (AVX512-BF16/AMX)" if native_bf16_matmul() else "no native bf16 matmul"
    timer = "wall clock" if clock is CLOCKS["wall"] else "process CPU time"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {bf16}, torch {torch.__version__} with {threads} "
        f"threads (torch.set_num_threads), timed by {timer}; load average {load} at start"
    )


def peak_matmul_flops(n: int = 2048, min_seconds: float = 1.0) -> float:
    """The MFU denominator: best fp32 n x n matmul rate, timed now, on the threads in use."""
    return measure_matmul_flops(n=n, min_seconds=min_seconds)
