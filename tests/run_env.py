"""The environment of every training process a test starts: W&B offline, and CPU threads split fairly.

The tests may run in parallel (`make test` runs pytest-xdist workers): each worker gets an equal share
of the machine's cores and a launch splits its share between its ranks. More threads than cores
only makes every run slower (torch's thread pools spin), which a 2-core CI machine feels at once."""

from __future__ import annotations

import os


def threads_per_rank(nproc: int) -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers // nproc)


def run_env(nproc: int = 1, **extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads_per_rank(nproc)), **extra}
