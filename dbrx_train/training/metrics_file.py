"""``metrics.jsonl``: one JSON object per trained batch, so runs can be compared without W&B.

Each line is ``{"batch": n, "tokens": t, <metric>: value, ...}`` where ``n`` counts completed
batches (1-based) and metric names are Composer's (``loss/train/total``, ...). Everything logged
while batch ``n`` runs, including evaluation after it, lands on that batch's line; what is logged
between batches (e.g. ``eval_first``) lands on the next batch's line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


class MetricsFileLogger(LoggerDestination):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._record: dict[str, Any] | None = None
        self._completed = 0  # batches trained when the last line was written
        self._pending: dict[str, Any] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        self._completed = int(state.timestamp.batch.value)
        if dist.get_global_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, lines for batches past the checkpoint describe work that is redone now.
        self._truncate_after(int(state.timestamp.batch.value))

    def batch_start(self, state: State, logger: Logger) -> None:
        self._flush()
        self._record = {"batch": int(state.timestamp.batch.value) + 1, **self._pending}
        self._pending = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Between batches (evaluation before the first one, an epoch change): kept for the next
        # batch's line, or written on its own at the end of training.
        target = self._record if self._record is not None else self._pending
        for key, value in metrics.items():
            target[key] = _plain(value)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._record is not None:
            self._record["tokens"] = int(state.timestamp.token.value)
        self._completed = int(state.timestamp.batch.value)
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()
        # Left over after the last batch: Composer's epoch-end time counters repeat the last line's;
        # anything else (an evaluation after training) gets a line of its own.
        if any(not key.startswith("time/") for key in self._pending):
            self._record = {"batch": self._completed, **self._pending}
            self._flush()
        self._pending = {}

    def close(self, state: State, logger: Logger) -> None:
        self._flush()

    def _flush(self) -> None:
        record, self._record = self._record, None
        if record is None or dist.get_global_rank() != 0 or len(record) <= 1:
            return
        ordered = {"batch": record.pop("batch"), "tokens": record.pop("tokens", None), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(ordered) + "\n")

    def _truncate_after(self, batch: int) -> None:
        truncate_jsonl_after(self.path, batch)


def truncate_jsonl_after(path: Path, batch: int) -> None:
    """Keep the lines of batches <= `batch` (a resume redoes the rest); drop a line torn by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["batch"] <= batch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible rather than dropping it
    return value
