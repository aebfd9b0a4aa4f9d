"""The console: one line per `console_log_interval`, what a person watching a run wants to see.

    [batch 40/120] loss 6.8214  lr 2.96e-03  28,120 tok/s  MFU 1.9%  ETA 0:01:43
    [eval @ batch 40] eval loss 6.9120
    [ICL @ batch 40] pydoc_topic/0-shot 0.312, stdlib_line_end/0-shot 0.180; gauntlet default_average +0.041 (3s)
    [batch 50/120] data mix: code 35%, prose 65%

Everything else a run logs (per-expert load, every loss term, perplexity, samples/s, ...) goes to
metrics.jsonl, W&B and the report, not here. Printed by rank 0 only; through tqdm, so a progress
bar on the same terminal is not torn.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from composer.core import State, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from tqdm import tqdm

from dbrx_train.config.run import console_interval
from dbrx_train.eval.gauntlet import GAUNTLET_PREFIX
from dbrx_train.eval.icl_suite import ICL_PREFIX
from dbrx_train.training.icl_eval import SECONDS_KEY

LOSS = "loss/train/total"
EVAL_LOSS = "metrics/eval/LanguageCrossEntropy"
TOKENS_PER_SEC = "throughput/tokens_per_sec"  # all ranks together
MFU = "throughput/device/mfu"
ETA_HOURS = "time/remaining_estimate"  # RuntimeEstimator, in hours
MIX_PREFIX = "data/mix/"


def format_eta(hours: float) -> str:
    seconds = int(round(hours * 3600))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleLine(LoggerDestination):
    def __init__(self, interval: str):
        self.interval = console_interval(interval)
        self.latest: dict[str, float] = {}  # the newest value of each metric
        self.printed_mix: dict[str, float] | None = None
        self.batch = 0  # the latest batch seen (loggers run before callbacks such as the ICL evaluation)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()  # eval metrics arrive as tensors
            if isinstance(value, (int, float)):
                self.latest[key] = float(value)
        if SECONDS_KEY in metrics:  # one ICL evaluation's scores arrive together
            self.write(icl_line(self.batch, metrics))

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = self.batch = int(state.timestamp.batch)
        mix = {k.removeprefix(MIX_PREFIX): v for k, v in self.latest.items() if k.startswith(MIX_PREFIX)}
        if mix and mix != self.printed_mix:
            shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in sorted(mix.items()))
            self.write(f"[batch {batch}{self._of_total(state)}] data mix: {shares}")
            self.printed_mix = mix
        due = self.interval.unit == TimeUnit.BATCH and batch % self.interval.value == 0
        if due or self._is_last(state):
            self.write(self.train_line(state))

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.EPOCH and int(state.timestamp.epoch) % self.interval.value == 0:
            self.write(self.train_line(state))

    def eval_end(self, state: State, logger: Logger) -> None:
        loss = self.latest.get(EVAL_LOSS)
        if loss is not None:
            self.write(f"[eval @ batch {int(state.timestamp.batch)}] eval loss {loss:.4f}")

    def train_line(self, state: State) -> str:
        parts = []
        m = self.latest
        if LOSS in m:
            parts.append(f"loss {m[LOSS]:.4f}")
        lr = next((v for k, v in m.items() if k.startswith("lr-")), None)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if TOKENS_PER_SEC in m:
            parts.append(f"{m[TOKENS_PER_SEC]:,.0f} tok/s")
        if MFU in m:
            parts.append(f"MFU {100 * m[MFU]:.1f}%")
        if ETA_HOURS in m:
            parts.append(f"ETA {format_eta(m[ETA_HOURS])}")
        return f"[batch {int(state.timestamp.batch)}{self._of_total(state)}] " + "  ".join(parts)

    def _of_total(self, state: State) -> str:
        total = total_batches(state)
        return f"/{total}" if total else ""

    def _is_last(self, state: State) -> bool:
        total = total_batches(state)
        return total is not None and int(state.timestamp.batch) == total

    @staticmethod
    def write(line: str) -> None:
        if dist.get_global_rank() == 0:
            tqdm.write(line)


def icl_line(batch: int, metrics: dict[str, Any]) -> str:
    """Each task's accuracy and the gauntlet's scores of one ICL evaluation, in one line."""
    tasks, gauntlet = [], []
    for key, value in metrics.items():
        if key.startswith(GAUNTLET_PREFIX):
            gauntlet.append(f"{key.removeprefix(GAUNTLET_PREFIX)} {float(value):+.3f}")
        elif key.startswith(ICL_PREFIX) and key != SECONDS_KEY:
            task = key.removeprefix(ICL_PREFIX).rsplit("/", 1)[0]  # <label>/<n>-shot
            tasks.append(f"{task} {float(value):.3f}")
    line = f"[ICL @ batch {batch}] " + ", ".join(tasks)
    if gauntlet:
        line += "; gauntlet " + ", ".join(gauntlet)
    return line + f" ({float(metrics[SECONDS_KEY]):.0f}s)"


def total_batches(state: State) -> int | None:
    """max_duration in batches, when it can be known (batches, tokens or samples per batch are fixed)."""
    duration = state.max_duration
    if duration is None:
        return None
    done = state.timestamp
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(duration.value) * int(state.dataloader_len)
    per_batch = {TimeUnit.TOKEN: int(done.token), TimeUnit.SAMPLE: int(done.sample)}.get(duration.unit)
    if per_batch and int(done.batch):
        return math.ceil(duration.value / (per_batch / int(done.batch)))
    return None
