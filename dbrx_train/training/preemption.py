"""SIGTERM (preemption, scancel, a pod being evicted) and Ctrl-C: finish the batch, checkpoint, stop.

The handler only sets a flag; at the end of each batch the ranks agree on it (one all-reduce of
a scalar), stop training together, and the CheckpointManager writes the final checkpoint at
FIT_END. train.py then prints where the run stopped and exits with 128 + the signal: 143 for
SIGTERM, 130 for SIGINT, so a pipeline never mistakes a stopped run for a finished one.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the launcher and every
rank. Each rank treats it as a request to save and stop (Composer's launcher, which turns its own
SIGINT into SIGTERM to the ranks, waits 30 s for them). A second Ctrl-C quits at once without
saving, and says so; the launcher then kills the ranks. The previous checkpoint is untouched.

Composer's launcher forwards a SIGTERM it receives to every rank and SIGKILLs them 30 s later (a
longer save is lost; the previous checkpoint is not). If the launcher itself is SIGKILLed, each
worker still gets SIGTERM: it asks the kernel for one when its parent dies (Linux PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger("dbrx_train")
_PR_SET_PDEATHSIG = 1
# Agreed over the ranks with MAX: a Ctrl-C anywhere makes the run's stop a Ctrl-C stop.
_NONE, _SIGTERM, _SIGINT = 0.0, 1.0, 2.0
_NAMES = {_SIGTERM: "SIGTERM", _SIGINT: "Ctrl-C (SIGINT)"}
_CODES = {_SIGTERM: 128 + signal.SIGTERM, _SIGINT: 128 + signal.SIGINT}


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


def quit_now() -> None:
    """The user pressed Ctrl-C twice: leave at once, as a kill would. Nothing more is written; the
    checkpoints already committed are complete, and an unfinished save is a `.tmp-*` folder that the
    next start removes, with the Streaming shared memory this process leaves (training/preflight.py).
    Python's resource tracker would report that memory as leaked after this line: it goes first."""
    for children in Path("/proc/self/task").glob("*/children"):  # Linux; elsewhere nothing to find
        for pid in children.read_text().split():
            try:
                if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
    print("dbrx-train: second Ctrl-C: quitting now without saving", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGINT)


class PreemptionHandler(Callback):
    def __init__(self) -> None:
        self.requested = _NONE
        self.stopped_at_batch: int | None = None
        self.stopped_by = _NONE  # what the ranks agreed stopped the run

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():
            # Kept until the process exits: a second SIGTERM must not kill the final save.
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            terminate_with_parent()

    def _on_signal(self, signum: int, frame: object) -> None:
        kind = _SIGINT if signum == signal.SIGINT else _SIGTERM
        if kind == _SIGINT and self.requested == _SIGINT:
            quit_now()
        if self.requested == _NONE:
            hint = " (Ctrl-C again to quit at once without saving)" if kind == _SIGINT else ""
            print(
                f"dbrx-train: {_NAMES[kind]} received; finishing this batch, then saving a checkpoint{hint}",
                file=sys.stderr,
                flush=True,
            )
        self.requested = max(self.requested, kind)

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = torch.tensor([self.requested])
        if dist.get_world_size() > 1:
            flag = state.device.tensor_to_device(flag)
            dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item() > _NONE:
            self.stopped_by = float(flag.item())
            self.stopped_at_batch = int(state.timestamp.batch)
            state.stop_training()

    def unless_stopped(self, due: Callable[[State, Event], bool]) -> Callable[[State, Event], bool]:
        """An evaluation schedule `due`, without its evaluation at the end of a run a signal stopped: the
        checkpoint is written by then, and the ranks must exit within the grace they were given
        (Composer's launcher SIGKILLs them 30 s after its SIGTERM, as schedulers do after theirs); an
        evaluation there only risks that kill (and exit code 1 instead of 128 + the signal)."""

        def schedule(state: State, event: Event) -> bool:
            if event == Event.FIT_END and self.stopped_at_batch is not None:
                return False
            return due(state, event)

        return schedule

    @property
    def exit_code(self) -> int:
        return _CODES[self.stopped_by]

    def stop_message(self, checkpoint: Path | None) -> str:
        saved = f"saved checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint was saved"
        return (
            f"dbrx-train: stopped by {_NAMES[self.stopped_by]} after batch {self.stopped_at_batch}; {saved}. "
            "Run the same command (with autoresume: true) to continue from it."
        )
