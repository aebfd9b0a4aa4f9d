"""SIGTERM (preemption, scancel, a pod being evicted): finish the batch, checkpoint, stop cleanly.

The handler only sets a flag; at the end of each batch the ranks agree on it (one all-reduce of
a scalar), stop training together, and the CheckpointManager writes the final checkpoint at
FIT_END. train.py then prints where the run stopped and exits with 143 (128 + SIGTERM), so a
pipeline never mistakes a preempted run for a finished one.

Composer's launcher forwards a SIGTERM it receives to every rank and SIGKILLs them 30 s later (a
longer save is lost; the previous checkpoint is not). If the launcher itself is SIGKILLed, each
worker still gets SIGTERM: it asks the kernel for one when its parent dies (Linux PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger("dbrx_train")
EXIT_CODE = 128 + signal.SIGTERM
_PR_SET_PDEATHSIG = 1


def terminate_with_parent() -> None:
    """Launched by a launcher (LOCAL_RANK set): get SIGTERM if it dies first. Linux only; no-op elsewhere."""
    if "LOCAL_RANK" not in os.environ or not os.uname().sysname == "Linux":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class PreemptionHandler(Callback):
    def __init__(self) -> None:
        self.requested = False
        self.stopped_at_batch: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():
            # Kept until the process exits: a second SIGTERM must not kill the final save.
            signal.signal(signal.SIGTERM, self._on_sigterm)
            terminate_with_parent()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if not self.requested:
            print("dbrx-train: SIGTERM received; finishing this batch, then saving a checkpoint", flush=True)
        self.requested = True

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_world_size() > 1:
            flag = state.device.tensor_to_device(flag)
            dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item() > 0:
            self.stopped_at_batch = int(state.timestamp.batch)
            state.stop_training()
