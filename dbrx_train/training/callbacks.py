"""Small Composer callbacks, one cross-cutting concern each."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class TrainPerplexity(Callback):
    """Logs exp(train LM cross-entropy) from the loss Composer already reduced over ranks.

    Cheaper than a train-time torchmetrics Perplexity, which would redo the softmax over the
    whole vocabulary every batch.
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = getattr(state, "total_loss_dict", None) or {}
        lm = losses.get("loss/train/lm_cross_entropy")
        if lm is not None and math.isfinite(lm):
            logger.log_metrics({"metrics/train/LanguagePerplexity": math.exp(min(lm, 80.0))})


class BatchSeededRNG(Callback):
    """Reseeds every RNG (python, numpy, torch) before each training batch from (seed, batch, rank).

    Dropout masks and router jitter then depend only on where the run is, not on how it got there:
    a resumed run draws exactly what the uninterrupted run drew, whatever Composer restored, however
    many dataloader iterators were created in between, and on every rank (Composer saves only rank
    0's RNG in sharded checkpoints and restores it only at epoch starts).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def after_dataloader(self, state: State, logger: Logger) -> None:
        key = f"{self.seed}/{int(state.timestamp.batch)}/{dist.get_global_rank()}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
        # What reproducibility.seed_all does, without its log line on every batch.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA device
