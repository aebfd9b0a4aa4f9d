"""Router balancing over the whole step: step-wide router losses and the expert biases.

The model never communicates; it exposes each forward's routing (`CausalLMOutput.router_stats`) and
takes step totals in. This callback does the summing over microbatches and ranks:

- ``moe_loss_scope: global``. Before the step's first forward (BEFORE_TRAIN_BATCH, with the device
  batch in ``state.batch``) every microbatch is routed once without gradients (``router_only``: no
  lm_head, no loss), the per-layer expert counts and counted tokens are summed and all-reduced over
  ranks, and the ComposerModel hands them to every forward of the step. Routing does not depend on
  the totals and the RNG is forked around this pass, so the training forwards route exactly as it
  did. The load-balancing loss and z-loss of the step are then those of all its tokens, whatever the
  microbatch size or world size. Cost: one forward without gradients per step, skipped when the step
  is a single microbatch on a single rank (whose own counts are the step's).
- Bias balancing (``moe_bias_update_rate > 0``, DeepSeek-V3). The training forwards' counts are added
  up (AFTER_FORWARD); after the optimizer step (BATCH_END, before the checkpoint callback saves) they
  are all-reduced and each layer's bias moves by rate x sign(mean load - load). Every rank sees the same
  integer counts and does the same arithmetic, so the biases stay equal on all ranks; at fit start rank
  0's are broadcast (after a checkpoint was loaded) so they start equal too. They are logged every
  ``log_interval`` batches as ``moe/layer_{i}/expert_bias/expert_{e}``.
"""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from dbrx_train.model.dbrx import RouterTotals
from dbrx_train.model.moe import DbrxRouter
from dbrx_train.training.composer_model import DbrxComposerModel

MODEL_INPUTS = ("input_ids", "labels", "sequence_id")


def composer_model_of(state: State) -> DbrxComposerModel:
    model = state.model
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def split_microbatches(batch: dict, microbatch_size: int) -> list[dict[str, torch.Tensor]]:
    """The model inputs of `batch` in the microbatches Composer trains on (consecutive rows)."""
    keys = [k for k in MODEL_INPUTS if k in batch]
    pieces = {k: batch[k].split(microbatch_size) for k in keys}
    return [{k: pieces[k][i] for k in keys} for i in range(len(pieces[keys[0]]))]


class RouterBalance(Callback):
    def __init__(self, global_scope: bool, bias_update_rate: float = 0.0, log_interval: int = 10):
        if bias_update_rate < 0 or log_interval <= 0:
            raise ValueError("router balance: bias_update_rate must be >= 0 and log_interval > 0")
        self.global_scope = global_scope
        self.bias_update_rate = bias_update_rate
        self.log_interval = log_interval
        self._biases: list[torch.Tensor] = []
        self._counts_LE: torch.Tensor | None = None  # this step's training forwards, this rank

    def fit_start(self, state: State, logger: Logger) -> None:
        routers = [m for m in composer_model_of(state).modules() if isinstance(m, DbrxRouter)]
        self._biases = [r.expert_bias for r in routers if r.expert_bias is not None]
        for bias in self._biases:
            dist.broadcast(bias, src=0)

    # -- moe_loss_scope: global -----------------------------------------------------------------
    def before_train_batch(self, state: State, logger: Logger) -> None:
        if not self.global_scope:
            return
        composer_model = composer_model_of(state)
        composer_model.router_totals = None
        microbatches = split_microbatches(state.batch, state.device_train_microbatch_size)
        if len(microbatches) == 1 and dist.get_world_size() == 1:
            return  # the forward's own counts are the step's
        counts_LE = tokens = None
        devices = [torch.cuda.current_device()] if state.batch["input_ids"].is_cuda else []
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=devices),
            get_precision_context(state.precision, state.precision_config),
            composer_model.router_only(),
        ):
            for microbatch in microbatches:
                stats = state.model(microbatch).router_stats
                mb_counts = torch.stack([s.counts_E for s in stats])
                counts_LE = mb_counts if counts_LE is None else counts_LE + mb_counts
                tokens = stats[0].tokens if tokens is None else tokens + stats[0].tokens
        samples = state.batch["input_ids"].new_tensor([len(state.batch["input_ids"])])
        packed = torch.cat([counts_LE.reshape(-1), tokens.reshape(1), samples]).to(torch.int64)
        dist.all_reduce(packed, reduce_operation="SUM")
        L, E = counts_LE.shape
        composer_model.router_totals = RouterTotals(
            packed[: L * E].view(L, E), packed[L * E], int(packed[L * E + 1])
        )

    def after_train_batch(self, state: State, logger: Logger) -> None:
        composer_model_of(state).router_totals = None  # eval forwards take their own tokens

    # -- bias balancing -----------------------------------------------------------------------------
    def after_forward(self, state: State, logger: Logger) -> None:
        if not self._biases:
            return
        counts_LE = torch.stack([s.counts_E for s in state.outputs.router_stats])
        self._counts_LE = counts_LE if self._counts_LE is None else self._counts_LE + counts_LE

    @torch.no_grad()
    def batch_end(self, state: State, logger: Logger) -> None:
        if not self._biases or self._counts_LE is None:
            return
        load_LE = self._counts_LE.to(torch.float64)
        self._counts_LE = None
        dist.all_reduce(load_LE, reduce_operation="SUM")
        step_LE = torch.sign(load_LE.mean(dim=-1, keepdim=True) - load_LE)
        for bias, step_E in zip(self._biases, step_LE, strict=True):
            bias.add_(step_E.to(bias.dtype), alpha=self.bias_update_rate)
        if int(state.timestamp.batch) % self.log_interval == 0:
            logger.log_metrics(
                {
                    f"moe/layer_{i}/expert_bias/expert_{e}": value
                    for i, bias in enumerate(self._biases)
                    for e, value in enumerate(bias.tolist())
                }
            )
