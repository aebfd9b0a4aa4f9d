"""`nonfinite_loss:` a NaN or infinite loss never reaches the weights; stop or skip the batch.

Each microbatch's loss terms are checked on the device (AFTER_LOSS, no sync). After the last
backward and before the optimizer step (AFTER_TRAIN_BATCH), the ranks agree with one all-reduce
of a (ranks x terms) table, because a loss that is non-finite on one rank has already spread
through the reduced gradients to all of them. If any entry is set, every gradient is set to None:
torch optimizers (and our Lion) skip parameters without a gradient, so the step changes neither
the weights nor the optimizer state (moments, step counts). The batch still counts (data
position, scheduler). Composer runs algorithms before callbacks, so gradient clipping has already
seen the NaN gradients (harmlessly) and never sees a None one; with amp_fp16 the GradScaler has
already unscaled them, found the inf and will skip the step itself.

- ``policy: skip``: warn with the batch index, count it (``nonfinite/skipped_batches``, saved in
  checkpoints) and go on; after ``max_consecutive_skips`` skips in a row, the next non-finite
  batch stops the run as ``stop`` does.
- ``policy: stop``: warn, stop training at the end of this batch (the final checkpoint then holds
  the weights from before it), and `exit_if_stopped` ends the process with `EXIT_CODE`.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)
EXIT_CODE = 3
LAUNCHER_GRACE_S = 30.0  # ranks other than a node's first wait this long (or for SIGTERM) before exiting
_INF, _NAN = 1.0, 2.0  # per rank and term, reduced with MAX: NaN wins over inf wins over finite


def loss_terms(loss: Any) -> dict[str, torch.Tensor]:
    """Composer's `state.loss` (a dict of terms, a tensor or a tuple of tensors) as named tensors."""
    if isinstance(loss, dict):
        return {str(k): v for k, v in loss.items() if isinstance(v, torch.Tensor)}
    if isinstance(loss, torch.Tensor):
        return {"loss": loss}
    return {f"loss{i}": v for i, v in enumerate(loss) if isinstance(v, torch.Tensor)}


class NonFiniteLossGuard(Callback):
    def __init__(
        self, policy: str = "stop", max_consecutive_skips: int | None = 10, save_folder: str | None = None
    ):
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss.policy must be 'stop' or 'skip'; got {policy!r}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.save_folder = save_folder
        self.skipped_batches = 0  # batches skipped and trained past, over the whole run (resumes included)
        self.consecutive = 0  # non-finite batches in a row, up to the current one
        self.stopped_at_batch: int | None = None  # 1-based index of the batch that stopped the run
        self.stop_reason = ""
        self.weights_from_before_batch: int | None = None  # the stop's checkpoint holds these weights
        self._names: list[str] = []
        self._local: torch.Tensor | None = None  # (terms,) on the loss's device, this batch

    # -- detection -------------------------------------------------------------------------
    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._local = None

    def after_loss(self, state: State, logger: Logger) -> None:
        terms = loss_terms(state.loss)
        if not self._names:
            self._names = list(terms)
        with torch.no_grad():
            codes = torch.stack(
                [
                    torch.maximum(terms[n].isnan().any() * _NAN, terms[n].isinf().any() * _INF).float()
                    for n in self._names
                ]
            )
        self._local = codes if self._local is None else torch.maximum(self._local, codes)

    def _gather(self, state: State) -> list[list[float]]:
        """(world_size, terms) codes, the same on every rank: one all-reduce per batch."""
        local = self._local
        if local is None:  # no loss this batch (cannot happen in Composer's loop; be safe)
            local = torch.zeros(len(self._names))
        table = torch.zeros(dist.get_world_size(), len(self._names), device=local.device)
        table[dist.get_global_rank()] = local
        dist.all_reduce(table, reduce_operation="MAX")
        return table.tolist()

    # -- decision --------------------------------------------------------------------------
    def after_train_batch(self, state: State, logger: Logger) -> None:
        table = self._gather(state)
        if not any(code for row in table for code in row):
            self.consecutive = 0
            return
        # Before optimizer.step: no gradient, no update, no change to the optimizer state.
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        state.model.zero_grad(set_to_none=True)

        batch = int(state.timestamp.batch) + 1  # 1-based, as metrics.jsonl's "batch"
        self.consecutive += 1
        what = describe(self._names, table)
        limit = self.max_consecutive_skips
        if self.policy == "stop":
            self._stop(batch, f"the loss was not finite ({what})", what)
        elif limit is not None and self.consecutive > limit:
            first = batch - self.consecutive + 1
            self._stop(
                batch,
                f"the loss was not finite for {self.consecutive} batches in a row (batches {first}-{batch}, "
                f"more than nonfinite_loss.max_consecutive_skips={limit}; this one: {what}). None of them "
                f"changed the weights",
                what,
                before=first,
            )
        else:
            self.skipped_batches += 1
            if dist.get_global_rank() == 0:
                log.warning(
                    "non-finite loss at batch %d (%s): skipped its optimizer step (%d skipped so far, "
                    "%d in a row)",
                    batch,
                    what,
                    self.skipped_batches,
                    self.consecutive,
                )

    def _stop(self, batch: int, reason: str, what: str, before: int | None = None) -> None:
        self.stopped_at_batch = batch
        self.stop_reason = reason
        self.weights_from_before_batch = before or batch
        if dist.get_global_rank() == 0:
            log.warning("non-finite loss at batch %d (%s): skipped its optimizer step; stopping", batch, what)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.skipped_batches:
            logger.log_metrics({"nonfinite/skipped_batches": self.skipped_batches})
        if self.stopped_at_batch is not None and int(state.timestamp.batch) == self.stopped_at_batch:
            self.consecutive = 0  # a stop ends the streak: a resumed run starts counting afresh
            state.stop_training()  # timestamp is past this batch now: max_duration becomes this batch

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.consecutive = int(state.get("consecutive", 0))

    # -- the end of the run ----------------------------------------------------------------------
    def stop_message(self) -> str:
        batch = self.stopped_at_batch
        where = f", in {self.save_folder}" if self.save_folder else ""
        before = self.weights_from_before_batch
        return (
            f"dbrx-train: stopped at batch {batch}: {self.stop_reason}. Its optimizer step was skipped, so "
            f"the checkpoint written at the end of the run (batch {batch}{where}) holds the weights from "
            f"before batch {before}; resuming from it continues with batch {batch + 1}. To go on, try a "
            f"lower optimizer.lr (or a longer scheduler.t_warmup, or algorithms.gradient_clipping), skip "
            f"the data of this batch, or set nonfinite_loss.policy: skip to skip such batches and count "
            f"them."
        )


def describe(names: list[str], table: list[list[float]]) -> str:
    """'lm_cross_entropy=nan, total=nan on rank 1' from the (ranks, terms) codes."""
    parts = []
    for j, name in enumerate(names):
        worst = max(row[j] for row in table)
        if worst:
            parts.append(f"{name}={'nan' if worst == _NAN else 'inf'}")
    ranks = [str(r) for r, row in enumerate(table) if any(row)]
    return f"{', '.join(parts)} on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"


def guard_of(trainer: Trainer) -> NonFiniteLossGuard | None:
    return next((c for c in trainer.state.callbacks if isinstance(c, NonFiniteLossGuard)), None)


def exit_if_stopped(trainer: Trainer) -> None:
    """After fit: if the guard stopped the run, say why on rank 0 and exit with EXIT_CODE on every rank."""
    guard = guard_of(trainer)
    if guard is None or guard.stopped_at_batch is None:
        return
    if dist.get_global_rank() == 0:
        print(guard.stop_message(), file=sys.stderr, flush=True)
    if dist.get_local_rank() != 0:
        # Under a launcher the first rank to exit sets the job's exit status, and the launcher stops
        # the others (Composer's also dumps that rank's whole log): let each node's local rank 0 go
        # first. The checkpoint is committed, so the launcher's SIGTERM may end this rank outright.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(LAUNCHER_GRACE_S)
    raise SystemExit(EXIT_CODE)
