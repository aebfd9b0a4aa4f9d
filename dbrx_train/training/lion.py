"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

Composer ships no Lion; LLM Foundry's DecoupledLionW defines the convention we follow: weight decay
is not multiplied by the raw lr but follows the schedule, ``p *= 1 - wd * lr / initial_lr``.
Element-wise only, so it works unchanged on FSDP2's sharded DTensor parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DecoupledLionW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ValueError(f"Lion lr must be > 0; got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must lie in [0, 1); got {betas}")
        super().__init__(params, {"lr": lr, "initial_lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd != 0:
                    p.mul_(1 - wd * lr / group["initial_lr"])
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                update = exp_avg.lerp(p.grad, 1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss
