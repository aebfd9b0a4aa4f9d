"""``samples.jsonl``: which dataset samples each batch trained on, one line per batch (rank 0).

`{"batch": n, "samples": [i, ...]}` with Streaming's global sample indices (over all streams) of
the whole global batch, sorted. It answers "what did the run see at batch n" (a loss spike, a
bad document) and lets tests check that a resumed run saw every sample exactly once. After a
resume, lines past the checkpoint are dropped, as in metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dbrx_train.training.metrics_file import truncate_jsonl_after


class SampleLog(Callback):
    def __init__(self, path: Path):
        self.path = path
        self._ids: list[int] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl_after(self.path, int(state.timestamp.batch))

    def after_dataloader(self, state: State, logger: Logger) -> None:
        # The whole device batch (later events see only the last microbatch).
        self._ids = state.batch["sample_idx"].reshape(-1).tolist()

    def batch_end(self, state: State, logger: Logger) -> None:
        ids = sorted(i for part in dist.all_gather_object(self._ids) for i in part)
        if dist.get_global_rank() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps({"batch": int(state.timestamp.batch), "samples": ids}) + "\n")
