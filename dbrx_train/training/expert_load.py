"""MoE health: per-layer expert load, router entropy, load balance, overload, and two warnings.

Reads the routing statistics each training forward already returns (`CausalLMOutput.router_stats`:
the experts actually chosen, with jitter, bias balancing and uniform assignment, over the counted
tokens only, so padding never shows up as load), so nothing is recomputed and nothing in the model
changes. Window sums stay on the device and are reduced over ranks only when logged; the step's
per-expert counts are all-reduced once per step (L x E integers), because overload is a property of
the global batch. Logged metrics (``i`` = layer, ``e`` = expert), every ``log_interval`` batches:

- ``moe/layer_{i}/load/expert_{e}``: fraction of the layer's top-k assignments routed to ``e``
  (1/E each when balanced);
- ``moe/layer_{i}/router_entropy``: mean per-token entropy of the router softmax, in nats
  (ln E = uniform, 0 = one-hot);
- ``moe/layer_{i}/load_balancing``: the Switch loss E * sum_e f_e * P_e over the window (1 = balanced);
- ``moe/layer_{i}/max_over_mean``: the busiest expert's load over the mean load, in the global batch of
  each step, averaged over the window (1 = balanced; E = one expert takes everything); and
  ``moe/max_over_mean``, the worst layer's;
- ``moe/layer_{i}/over_capacity_1.0`` and ``_1.25``: the fraction of assignments a token-dropping MoE
  with capacity factor 1.0 / 1.25 would drop (each forward, each expert beyond capacity x its fair
  share of that forward's assignments);
- ``moe/collapsed_experts``: experts currently below ``collapse_fraction`` of their fair share for
  at least ``collapse_window`` batches; each collapse is also warned about once;
- ``moe/imbalance_alarms``: layers whose load-balancing loss fell over the last ``imbalance_window``
  batches while their max/mean load rose by more than ``imbalance_rise`` (a falling balancing loss is
  not proof of balance); each is warned about once until it clears.
"""

from __future__ import annotations

import logging
import warnings

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)
CAPACITY_FACTORS = (1.0, 1.25)


def over_capacity(counts_LE: torch.Tensor, factor: float) -> torch.Tensor:
    """(L,) assignments beyond `factor` x the fair share (assignments / E) of each layer's experts."""
    counts = counts_LE.to(torch.float64)
    capacity_L1 = factor * counts.sum(-1, keepdim=True) / counts.shape[-1]
    return (counts - capacity_L1).clamp_min(0).sum(-1)


def max_over_mean(counts_LE: torch.Tensor) -> torch.Tensor:
    counts = counts_LE.to(torch.float64)
    return counts.max(-1).values / counts.mean(-1).clamp_min(1e-12)


class ExpertLoadMonitor(Callback):
    def __init__(
        self,
        log_interval: int = 10,
        collapse_fraction: float = 0.1,
        collapse_window: int = 100,
        imbalance_window: int = 100,
        imbalance_rise: float = 0.1,
    ):
        if log_interval <= 0 or collapse_window <= 0 or not 0 < collapse_fraction < 1:
            raise ValueError(
                "expert_load: log_interval and collapse_window must be > 0, collapse_fraction in (0, 1)"
            )
        if imbalance_window < 2 * log_interval or imbalance_rise < 0:
            raise ValueError(
                "expert_load: imbalance_window must span at least two logs (>= 2 x log_interval), "
                "imbalance_rise must be >= 0"
            )
        self.log_interval = log_interval
        self.collapse_fraction = collapse_fraction
        self.collapse_window = collapse_window
        self.imbalance_window = imbalance_window
        self.imbalance_rise = imbalance_rise
        self._window: dict[str, torch.Tensor] = {}  # sums over the window, this rank (ratio: global)
        self._step_counts: torch.Tensor | None = None  # (L, E) this step's forwards, this rank
        self._low_since: dict[tuple[int, int], int] = {}
        self._warned: set[tuple[int, int]] = set()
        self._history: dict[int, list[tuple[int, float, float]]] = {}  # layer -> (batch, lb, ratio)
        self._alarmed: set[int] = set()

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._window[key] = value if key not in self._window else self._window[key] + value

    def after_forward(self, state: State, logger: Logger) -> None:
        stats = state.outputs.router_stats
        with torch.no_grad():
            counts_LE = torch.stack([s.counts_E for s in stats])
            self._add("counts", counts_LE)
            self._add("probs", torch.stack([s.probs_E for s in stats]))
            self._add("entropy", torch.stack([s.entropy for s in stats]))
            self._add("tokens", torch.stack([s.tokens for s in stats]).to(torch.float64))
            for factor in CAPACITY_FACTORS:
                self._add(f"over_{factor}", over_capacity(counts_LE, factor))
            self._step_counts = counts_LE if self._step_counts is None else self._step_counts + counts_LE

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._step_counts is not None:
            step = self._step_counts
            self._step_counts = None
            dist.all_reduce(step, reduce_operation="SUM")
            self._add("ratio", max_over_mean(step))
            self._add("steps", torch.ones((), dtype=torch.float64, device=step.device))
        batch = int(state.timestamp.batch)
        if batch % self.log_interval or "counts" not in self._window:
            return
        window, self._window = self._window, {}
        ratio_L = window.pop("ratio") / window.pop("steps")  # already global
        names = list(window)
        flat = torch.cat([window[n].to(torch.float64).reshape(-1) for n in names])
        dist.all_reduce(flat, reduce_operation="SUM")
        totals, offset = {}, 0
        for name in names:
            size = window[name].numel()
            totals[name] = flat[offset : offset + size].view(window[name].shape)
            offset += size
        counts_LE, probs_LE = totals["counts"], totals["probs"]
        num_layers, num_experts = counts_LE.shape
        assignments_L = counts_LE.sum(-1).clamp_min(1)
        tokens_L = totals["tokens"].clamp_min(1)
        f_LE = counts_LE / assignments_L[:, None]
        P_LE = probs_LE / tokens_L[:, None]
        balance_L = num_experts * (f_LE * P_LE).sum(-1)
        values = {
            "f": f_LE.tolist(),
            "entropy": (totals["entropy"] / tokens_L).tolist(),
            "balance": balance_L.tolist(),
            "ratio": ratio_L.tolist(),
            **{f"over_{c}": (totals[f"over_{c}"] / assignments_L).tolist() for c in CAPACITY_FACTORS},
        }
        metrics: dict[str, float] = {}
        collapsed = 0
        for layer in range(num_layers):
            for e, frac in enumerate(values["f"][layer]):
                metrics[f"moe/layer_{layer}/load/expert_{e}"] = frac
            metrics[f"moe/layer_{layer}/router_entropy"] = values["entropy"][layer]
            metrics[f"moe/layer_{layer}/load_balancing"] = values["balance"][layer]
            metrics[f"moe/layer_{layer}/max_over_mean"] = values["ratio"][layer]
            for factor in CAPACITY_FACTORS:
                metrics[f"moe/layer_{layer}/over_capacity_{factor}"] = values[f"over_{factor}"][layer]
            collapsed += self._track_collapse(layer, values["f"][layer], batch)
            self._track_imbalance(layer, batch, values["balance"][layer], values["ratio"][layer])
        metrics["moe/collapsed_experts"] = float(collapsed)
        metrics["moe/max_over_mean"] = max(values["ratio"])
        metrics["moe/imbalance_alarms"] = float(len(self._alarmed))
        logger.log_metrics(metrics)

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
                if key not in self._warned:
                    self._warned.add(key)
                    self._warn(
                        f"MoE expert collapse: layer {layer} expert {e} has received {frac:.2%} of the "
                        f"assignments (fair share {fair:.2%}) for {batch - since} batches; consider a larger "
                        "moe_loss_weight, router jitter (moe_jitter_eps) or bias balancing (moe_bias_update_rate)"
                    )
        return collapsed

    def _track_imbalance(self, layer: int, batch: int, balance: float, ratio: float) -> bool:
        """Alarm when, over the last `imbalance_window` batches, the balancing loss fell while the
        busiest expert's load over the mean rose by more than `imbalance_rise` (relative)."""
        history = self._history.setdefault(layer, [])
        history.append((batch, balance, ratio))
        while batch - history[0][0] > self.imbalance_window:
            history.pop(0)
        first_batch, first_balance, first_ratio = history[0]
        alarm = (
            batch - first_batch >= self.imbalance_window
            and balance < first_balance
            and ratio > first_ratio * (1 + self.imbalance_rise)
        )
        if not alarm:
            self._alarmed.discard(layer)
            return False
        if layer not in self._alarmed:
            self._alarmed.add(layer)
            self._warn(
                f"MoE imbalance: layer {layer}'s load-balancing loss fell {first_balance:.4f} -> {balance:.4f} "
                f"over batches {first_batch}-{batch} while its busiest expert's load rose from "
                f"{first_ratio:.2f}x to {ratio:.2f}x the mean; the balancing loss is hiding an overload "
                "(see moe/layer_*/max_over_mean and over_capacity_*)"
            )
        return True

    @staticmethod
    def _warn(message: str) -> None:
        if dist.get_global_rank() == 0:
            log.warning(message)
            warnings.warn(message, stacklevel=2)
