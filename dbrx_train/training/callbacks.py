"""Small Composer callbacks, one cross-cutting concern each."""

from __future__ import annotations

import math

from composer.core import Callback, State
from composer.loggers import Logger


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
