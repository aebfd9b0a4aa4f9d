"""MoE health: per-layer expert load, router entropy and load balance, and a collapse warning.

Forward hooks on each ``DbrxRouter`` read the routing it already computed (the experts actually
chosen, with jitter and uniform assignment, and the fp32 probabilities), so nothing is recomputed
and nothing in the model changes. Counts accumulate on the device over ``log_interval`` batches and are reduced
over ranks only when logged. Logged metrics (``i`` = layer, ``e`` = expert):

- ``moe/layer_{i}/load/expert_{e}``: fraction of the layer's top-k assignments routed to ``e``
  (1/E each when balanced);
- ``moe/layer_{i}/router_entropy``: mean per-token entropy of the router softmax, in nats
  (ln E = uniform, 0 = one-hot);
- ``moe/layer_{i}/load_balancing``: the Switch loss E * sum_e f_e * P_e over the window (1 = balanced);
- ``moe/collapsed_experts``: experts currently below ``collapse_fraction`` of their fair share for
  at least ``collapse_window`` batches; each collapse is also warned about once.
"""

from __future__ import annotations

import logging
import re
import warnings

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dbrx_train.model.moe import DbrxRouter, Routing

log = logging.getLogger(__name__)


class ExpertLoadMonitor(Callback):
    def __init__(self, log_interval: int = 10, collapse_fraction: float = 0.1, collapse_window: int = 100):
        if log_interval <= 0 or collapse_window <= 0 or not 0 < collapse_fraction < 1:
            raise ValueError(
                "expert_load: log_interval and collapse_window must be > 0, collapse_fraction in (0, 1)"
            )
        self.log_interval = log_interval
        self.collapse_fraction = collapse_fraction
        self.collapse_window = collapse_window
        self._handles: list = []
        self._counting = False
        # per layer: assignment counts (E,), summed router probs (E,), summed token entropy, tokens
        self._counts: dict[int, torch.Tensor] = {}
        self._probs: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}
        self._low_since: dict[tuple[int, int], int] = {}
        self._warned: set[tuple[int, int]] = set()

    def fit_start(self, state: State, logger: Logger) -> None:
        for name, module in state.model.named_modules():
            if isinstance(module, DbrxRouter):
                layer = int(re.search(r"blocks\.(\d+)\.", name).group(1))
                self._handles.append(module.register_forward_hook(self._make_hook(layer)))

    def _make_hook(self, layer: int):
        def hook(_module, _inputs, routing: Routing) -> None:
            # Only the training forward: activation checkpointing re-runs forward inside backward.
            if not self._counting:
                return
            with torch.no_grad():
                probs_NE = routing.probs_NE.detach()
                counts_E = torch.bincount(routing.experts_Nk.reshape(-1), minlength=probs_NE.shape[-1])
                entropy = -(probs_NE * probs_NE.clamp_min(1e-30).log()).sum()
                if layer in self._counts:
                    self._counts[layer] += counts_E
                    self._probs[layer] += probs_NE.sum(0)
                    self._entropy[layer] += entropy
                    self._tokens[layer] += probs_NE.shape[0]
                else:
                    self._counts[layer] = counts_E
                    self._probs[layer] = probs_NE.sum(0)
                    self._entropy[layer] = entropy
                    self._tokens[layer] = probs_NE.shape[0]

        return hook

    def before_forward(self, state: State, logger: Logger) -> None:
        self._counting = True

    def after_forward(self, state: State, logger: Logger) -> None:
        self._counting = False

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch % self.log_interval or not self._counts:
            return
        metrics: dict[str, float] = {}
        collapsed = 0
        for layer in sorted(self._counts):
            stats = torch.cat(
                [
                    self._counts[layer].float(),
                    self._probs[layer],
                    self._entropy[layer].reshape(1),
                    torch.tensor([float(self._tokens[layer])], device=self._probs[layer].device),
                ]
            )
            dist.all_reduce(stats, reduce_operation="SUM")
            num_experts = self._counts[layer].numel()
            counts_E, probs_E = stats[:num_experts], stats[num_experts : 2 * num_experts]
            entropy_sum, tokens = stats[-2].item(), stats[-1].item()
            f_E = (counts_E / counts_E.sum()).tolist()
            P_E = (probs_E / tokens).tolist()
            for e, frac in enumerate(f_E):
                metrics[f"moe/layer_{layer}/load/expert_{e}"] = frac
            metrics[f"moe/layer_{layer}/router_entropy"] = entropy_sum / tokens
            metrics[f"moe/layer_{layer}/load_balancing"] = num_experts * sum(
                f * p for f, p in zip(f_E, P_E, strict=True)
            )
            collapsed += self._track_collapse(layer, f_E, batch)
        metrics["moe/collapsed_experts"] = float(collapsed)
        logger.log_metrics(metrics)
        self._counts.clear()
        self._probs.clear()
        self._entropy.clear()
        self._tokens.clear()

    def _track_collapse(self, layer: int, f_E: list[float], batch: int) -> int:
        fair = 1.0 / len(f_E)
        collapsed = 0
        for e, frac in enumerate(f_E):
            key = (layer, e)
            if frac >= self.collapse_fraction * fair:
                self._low_since.pop(key, None)
                self._warned.discard(key)
                continue
            since = self._low_since.setdefault(key, batch - self.log_interval)
            if batch - since >= self.collapse_window:
                collapsed += 1
                if key not in self._warned and dist.get_global_rank() == 0:
                    self._warned.add(key)
                    msg = (
                        f"MoE expert collapse: layer {layer} expert {e} has received {frac:.2%} of the "
                        f"assignments (fair share {fair:.2%}) for {batch - since} batches; consider a larger "
                        "moe_loss_weight or router jitter (moe_jitter_eps)"
                    )
                    log.warning(msg)
                    warnings.warn(msg, stacklevel=1)
        return collapsed

    def fit_end(self, state: State, logger: Logger) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
