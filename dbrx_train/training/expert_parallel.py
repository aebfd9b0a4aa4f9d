"""Expert parallelism: each rank of an expert-parallel group holds E/ep experts, tokens travel to them.

MegaBlocks' `moe_expert_model_parallelism`, for the torch backend. Per MoE layer and rank:
1. route and sort the local tokens' (token, slot) assignments by global expert, as without EP;
2. exchange the per-expert counts (one all_to_all of E ints, the layer's host sync);
3. send each row to the rank that owns its expert (all_to_all_single, uneven splits);
4. regroup the received rows by local expert, run the GLU of the E/ep local experts;
5. send the results back (the reverse all_to_all) and combine them with the routing weights.

The expert weights stay one (E*F, D) parameter each, as a DTensor sharded by rows over the EP mesh:
the same names, global shapes and row layout as without EP, so checkpoints reshard between EP degrees.
Router, load-balancing loss and everything else are unchanged. The model file knows nothing of
this: `apply_expert_parallel` swaps each layer's experts module from outside.

Gradients: an expert's weight gradient is computed on its owner from the rows of every rank, so it
arrives summed over the EP group, where data parallelism wants the mean; `_ScaleGrad` divides it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dbrx_train.model.moe import (
    ExpertGLU,
    MegaBlocksExperts,
    Routing,
    TorchExperts,
    combine,
    expert_glu,
    gather,
    sort_by_expert,
)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def local_expert_order(recv_counts_SE: list[list[int]]) -> torch.Tensor:
    """Rows arrive grouped by source rank, then by local expert; this permutation groups them by
    local expert, then by source rank (so each expert's rows are contiguous for its GLU)."""
    starts, offset = [], 0
    for row in recv_counts_SE:  # sources in arrival order
        starts.append([])
        for count in row:
            starts[-1].append(offset)
            offset += count
    pieces = [
        torch.arange(starts[s][e], starts[s][e] + recv_counts_SE[s][e])
        for e in range(len(recv_counts_SE[0]))
        for s in range(len(recv_counts_SE))
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class ExpertParallelExperts(nn.Module):
    """The torch backend's experts, E/ep of them per rank, fed by all-to-all token exchange."""

    def __init__(self, mlp: ExpertGLU, ep_mesh: DeviceMesh, grad_scale: float):
        super().__init__()
        if ep_mesh.ndim != 1:
            raise ValueError(f"the expert-parallel mesh must be 1-D, got {ep_mesh}")
        self.mlp = mlp
        self.ep_mesh = ep_mesh
        self.ep = ep_mesh.size()
        if mlp.num_experts % self.ep:
            raise ValueError(
                f"moe_num_experts={mlp.num_experts} is not divisible by expert_parallel_degree={self.ep}"
            )
        self.local_experts = mlp.num_experts // self.ep
        self.grad_scale = grad_scale

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's experts' (E/ep, F, D) weights; their gradients get `grad_scale`."""
        mlp, shape = self.mlp, (self.local_experts, self.mlp.ffn_hidden_size, self.mlp.d_model)
        out = []
        for w in (mlp.w1, mlp.v1, mlp.w2):
            local = w.to_local() if isinstance(w, DTensor) else w
            if local.shape[0] != shape[0] * shape[1]:
                raise RuntimeError(
                    f"expert weight shard has {local.shape[0]} rows, expected {shape[0] * shape[1]} "
                    f"({self.local_experts} experts of {shape[1]}): is it sharded over the EP mesh?"
                )
            out.append(_ScaleGrad.apply(local, self.grad_scale).view(shape))
        return out[0], out[1], out[2]

    def forward(self, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        mlp, group, ep, local = self.mlp, self.ep_mesh.get_group(), self.ep, self.local_experts
        top_k = routing.experts_Nk.shape[-1]
        bins = sort_by_expert(routing.experts_Nk, mlp.num_experts)
        with torch.no_grad():
            # Rank r receives, from each source s, how many rows s sends to each of r's experts.
            recv_counts = torch.empty_like(bins.tokens_per_expert_E)
            dist.all_to_all_single(recv_counts, bins.tokens_per_expert_E, group=group)
            # The layer's host sync: the split sizes of the row exchange.
            send_splits = bins.tokens_per_expert_E.view(ep, local).sum(1).tolist()
            recv_counts_SE = recv_counts.view(ep, local).tolist()
        recv_splits = [sum(row) for row in recv_counts_SE]
        x_MD = gather(x_ND, bins.order_M, top_k)  # sorted by global expert = grouped by owner rank
        x_recv = dist_fn.all_to_all_single(
            x_MD.new_empty(sum(recv_splits), x_MD.shape[-1]), x_MD, recv_splits, send_splits, group=group
        )
        order = local_expert_order(recv_counts_SE).to(x_recv.device)
        tokens_per_local_expert = [sum(recv_counts_SE[s][e] for s in range(ep)) for e in range(local)]
        w1, v1, w2 = self.local_weights()
        y_local = expert_glu(x_recv.index_select(0, order), tokens_per_local_expert, w1, v1, w2, mlp.act)
        # Undo the regrouping (index_copy into a fresh tensor is differentiable in y_local).
        y_recv = y_local.new_zeros(y_local.shape).index_copy(0, order, y_local)
        y_MD = dist_fn.all_to_all_single(
            y_recv.new_empty(sum(send_splits), y_recv.shape[-1]),
            y_recv,
            send_splits,
            recv_splits,
            group=group,
        )
        return combine(y_MD, bins, routing.weights_Nk, x_ND.shape[0])


def shard_expert_weights(mlp: ExpertGLU, ep_mesh: DeviceMesh) -> None:
    """Make w1/v1/w2 DTensors sharded by rows (Shard(0)) over the EP mesh: rank r keeps experts
    [r*E/ep, (r+1)*E/ep). Every rank must hold the same full weights when this runs."""
    for name in ("w1", "v1", "w2"):
        full = getattr(mlp, name)
        sharded = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
        setattr(mlp, name, nn.Parameter(sharded, requires_grad=full.requires_grad))


def apply_expert_parallel(
    model: nn.Module, ep_mesh: DeviceMesh, grad_scale: float
) -> list[ExpertParallelExperts]:
    """Swap every torch-backend experts module of `model` for its expert-parallel version; returns
    the new modules."""
    swapped = []
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, TorchExperts) and not isinstance(experts, ExpertParallelExperts):
            if isinstance(experts, MegaBlocksExperts) and not experts.backend.torch_fallback:
                raise ValueError(
                    "expert parallelism runs the torch backend's experts; set model.ffn_config.moe_backend: torch"
                )
            shard_expert_weights(experts.mlp, ep_mesh)
            module.experts = ExpertParallelExperts(experts.mlp, ep_mesh, grad_scale)
            swapped.append(module.experts)
    return swapped


def clip_grad_norm_sharded_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for gradients on several meshes (FSDP's and the experts').

    torch's version stacks per-parameter norms, which DTensors on different meshes refuse. Here every
    gradient is a DTensor whose local pieces are disjoint across all ranks (FSDP shards by rows over
    the world; experts by rows over ep, then over expert_dp), so the total norm is the square root of
    the all-reduced sum of local squares. Same clip coefficient as torch: max_norm / (norm + 1e-6), <= 1.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    for g in grads:
        if not isinstance(g, DTensor) or not all(placement.is_shard() for placement in g.placements):
            raise RuntimeError(
                "clip_grad_norm_sharded_ needs every gradient sharded over every mesh dimension (FSDP "
                f"FULL_SHARD / SHARD_GRAD_OP), got {type(g).__name__} {getattr(g, 'placements', '')}"
            )
    device = grads[0].to_local().device if grads else torch.device("cpu")
    local_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        local_sq += g.to_local().float().pow(2).sum()
    dist.all_reduce(local_sq)
    total = local_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.to_local().mul_(coef.to(g.dtype))
    return total
