"""Mixture-of-experts FFN: router + dropless experts + load-balancing loss.

Shapes (suffixes on names): N tokens (= B*T), D d_model, E experts, F ffn_hidden_size, k top_k,
M = N*k token-to-expert assignments.

The forward pass is a sequence of named steps over plain tensors, each testable alone:
    route          x_ND -> top-k experts and weights per token (+ router probabilities)
    sort_by_expert experts_Nk -> assignment order grouped by expert, tokens per expert, offsets
    gather         x_ND -> x_MD, rows of each expert contiguous
    expert_glu     one GLU per expert over its contiguous slice (E matmuls per weight, no masking)
    combine        y_MD -> out_ND, weighted by the routing weights (index_add)
Every token reaches all of its top-k experts (dropless: no capacity factor, no token dropping), so
the result equals a dense loop over experts exactly, up to float summation order.

The experts' backend ("torch" here; "megablocks" on CUDA later) is chosen once in `build_experts`;
every backend keeps its parameters in the same `ExpertGLU` (`mlp.w1`, `mlp.v1`, `mlp.w2`, each
(E*F, D) as in HF DBRX) so checkpoints move between backends. The load-balancing loss is returned
with the FFN output, so it flows through autograd and module outputs, never through a global list.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dbrx_train.model.config import DbrxFFNConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
    "relu": F.relu,
}


# ---------------------------------------------------------------------------------------------
# Step 1: route
# ---------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    weights_Nk: torch.Tensor  # fp32 weight of each chosen expert (normalised if configured)
    experts_Nk: torch.Tensor  # int64 expert ids, ordered by decreasing probability
    probs_NE: torch.Tensor  # fp32 softmax over all experts (feeds the load-balancing loss)
    logits_NE: torch.Tensor  # raw router logits, in the input dtype


def route(
    x_ND: torch.Tensor,
    router_ED: torch.Tensor,
    top_k: int,
    normalize_p: float | None = None,
    jitter_eps: float | None = None,
    uniform_assignment: bool = False,
) -> Routing:
    """Pick top_k experts per token. Pass `jitter_eps` only while training."""
    if jitter_eps is not None:
        # Multiplicative noise on the router's input only (as MegaBlocks); the experts see clean x.
        noise_ND = torch.empty_like(x_ND).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
        x_ND = x_ND * noise_ND
    logits_NE = F.linear(x_ND, router_ED)
    # fp32 softmax: bf16 probabilities are too coarse to rank 16 experts reliably.
    probs_NE = logits_NE.softmax(dim=-1, dtype=torch.float32)
    weights_Nk, experts_Nk = torch.topk(probs_NE, top_k, dim=-1)
    if normalize_p is not None:
        weights_Nk = weights_Nk / torch.linalg.vector_norm(weights_Nk, ord=normalize_p, dim=-1, keepdim=True)
    if uniform_assignment:
        # MegaBlocks' benchmarking mode: assignment i goes to expert i mod E, so load is perfectly
        # balanced whatever the router says; the weights stay the router's top-k weights.
        num_experts = router_ED.shape[0]
        experts_Nk = torch.arange(experts_Nk.numel(), device=x_ND.device).remainder(num_experts)
        experts_Nk = experts_Nk.view(-1, top_k)
    return Routing(weights_Nk, experts_Nk, probs_NE, logits_NE)


# ---------------------------------------------------------------------------------------------
# Step 2: sort assignments by expert (indices and bins)
# ---------------------------------------------------------------------------------------------
class ExpertBins(NamedTuple):
    order_M: torch.Tensor  # flat assignment ids (token * k + slot) sorted by expert, stable
    tokens_per_expert_E: torch.Tensor  # histogram of the assignments
    offsets_E1: torch.Tensor  # (E+1,) expert e owns sorted rows offsets[e]:offsets[e+1]


def sort_by_expert(experts_Nk: torch.Tensor, num_experts: int) -> ExpertBins:
    experts_M = experts_Nk.reshape(-1)
    # Stable, so within an expert the rows keep token order (deterministic, and cache friendly).
    order_M = torch.argsort(experts_M, stable=True)
    tokens_per_expert_E = torch.bincount(experts_M, minlength=num_experts)
    offsets_E1 = F.pad(torch.cumsum(tokens_per_expert_E, dim=0), (1, 0))
    return ExpertBins(order_M, tokens_per_expert_E, offsets_E1)


# ---------------------------------------------------------------------------------------------
# Steps 3-5: gather, per-expert GLU, combine
# ---------------------------------------------------------------------------------------------
def gather(x_ND: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    return x_ND.index_select(0, order_M // top_k)


def expert_glu(
    x_MD: torch.Tensor,
    tokens_per_expert: list[int],
    w1_EFD: torch.Tensor,
    v1_EFD: torch.Tensor,
    w2_EFD: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Expert e computes (act(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e on its own rows (HF DBRX's GLU)."""
    # unbind once: its backward is a single stack, where indexing per expert would allocate a
    # full-size zero gradient per expert.
    w1s, v1s, w2s = w1_EFD.unbind(0), v1_EFD.unbind(0), w2_EFD.unbind(0)
    # Two matmuls for w1 and v1: fusing them needs a per-step copy of the weights (torch.cat),
    # which measured ~30% slower on CPU.
    y_pieces = []
    for e, x_e in enumerate(x_MD.split(tokens_per_expert)):  # x_e: (rows of expert e, D)
        if x_e.shape[0] == 0:
            continue
        h_e = act(x_e @ w1s[e].t()) * (x_e @ v1s[e].t())  # (rows, F)
        y_pieces.append(h_e @ w2s[e])
    if not y_pieces:  # no tokens at all
        return x_MD.new_zeros(x_MD.shape)
    return torch.cat(y_pieces)


def combine(y_MD: torch.Tensor, bins: ExpertBins, weights_Nk: torch.Tensor, num_tokens: int) -> torch.Tensor:
    top_k = weights_Nk.shape[-1]
    weight_M = weights_Nk.reshape(-1).index_select(0, bins.order_M).to(y_MD.dtype)
    out_ND = y_MD.new_zeros(num_tokens, y_MD.shape[-1])
    return out_ND.index_add(0, bins.order_M // top_k, y_MD * weight_M[:, None])


# ---------------------------------------------------------------------------------------------
# Load-balancing loss
# ---------------------------------------------------------------------------------------------
def load_balancing_loss(probs_NE: torch.Tensor, experts_Nk: torch.Tensor) -> torch.Tensor:
    """Switch Transformer / MegaBlocks loss of one layer: E * sum_e f_e * P_e.

    f_e: fraction of the N*k assignments routed to e (no gradient); P_e: mean router probability of
    e over tokens. Equals 1 when routing is uniform. Note transformers' DBRX loss differs: it pools all
    layers before the product and its f_e is a fraction of N (not N*k), so it is k times larger.
    """
    num_experts = probs_NE.shape[-1]
    counts_E = torch.bincount(experts_Nk.reshape(-1), minlength=num_experts)
    f_E = counts_E.to(torch.float32) / experts_Nk.numel()
    P_E = probs_NE.float().mean(dim=0)
    return num_experts * torch.dot(f_E, P_E)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class DbrxRouter(nn.Module):
    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig):
        super().__init__()
        self.top_k = ffn_config.moe_top_k
        self.normalize_p = ffn_config.moe_normalize_expert_weights
        self.jitter_eps = ffn_config.moe_jitter_eps
        self.uniform_assignment = ffn_config.uniform_expert_assignment
        self.layer = nn.Linear(d_model, ffn_config.moe_num_experts, bias=False)

    def forward(self, x_ND: torch.Tensor) -> Routing:
        return route(
            x_ND,
            self.layer.weight,
            self.top_k,
            normalize_p=self.normalize_p,
            jitter_eps=self.jitter_eps if self.training else None,
            uniform_assignment=self.uniform_assignment,
        )


class ExpertGLU(nn.Module):
    """The expert weights of every backend; shapes and names are HF DBRX's `ffn.experts.mlp.*`."""

    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig):
        super().__init__()
        self.num_experts = ffn_config.moe_num_experts
        self.ffn_hidden_size = ffn_config.ffn_hidden_size
        self.d_model = d_model
        self.act = ACTIVATIONS[ffn_config.ffn_act_fn["name"]]
        shape = (self.num_experts * self.ffn_hidden_size, d_model)
        self.w1 = nn.Parameter(torch.empty(shape))  # gate, rows of expert e: [e*F, (e+1)*F)
        self.v1 = nn.Parameter(torch.empty(shape))  # up
        self.w2 = nn.Parameter(torch.empty(shape))  # down, used as (F, D) without transpose

    def per_expert(self, w: torch.Tensor) -> torch.Tensor:
        return w.view(self.num_experts, self.ffn_hidden_size, self.d_model)


class TorchExperts(nn.Module):
    """Dropless experts in plain PyTorch: exact on any device, a loop of E matmuls per weight."""

    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig):
        super().__init__()
        self.mlp = ExpertGLU(d_model, ffn_config)

    def forward(self, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        mlp = self.mlp
        bins = sort_by_expert(routing.experts_Nk, mlp.num_experts)
        x_MD = gather(x_ND, bins.order_M, routing.experts_Nk.shape[-1])
        # The one host sync of the layer: E slice lengths, needed to split x_MD.
        tokens_per_expert = bins.tokens_per_expert_E.tolist()
        w1, v1, w2 = mlp.per_expert(mlp.w1), mlp.per_expert(mlp.v1), mlp.per_expert(mlp.w2)
        y_MD = expert_glu(x_MD, tokens_per_expert, w1, v1, w2, mlp.act)
        return combine(y_MD, bins, routing.weights_Nk, x_ND.shape[0])


def resolve_moe_backend(requested: str) -> str:
    """Map "auto" to the backend this machine runs; "megablocks" must be installed to be asked for.

    "auto" stays on "torch" until the MegaBlocks backend is implemented, so installing the [gpu]
    extra never turns a working config into a NotImplementedError.
    """
    megablocks_installed = importlib.util.find_spec("megablocks") is not None
    if requested == "auto":
        return "torch"
    if requested == "megablocks" and not megablocks_installed:
        raise ImportError(
            "ffn_config.moe_backend is 'megablocks' but the megablocks package is not installed; "
            "run `pip install -e .[gpu]` on a CUDA machine, or set ffn_config.moe_backend to 'torch'"
        )
    return requested


def build_experts(d_model: int, ffn_config: DbrxFFNConfig) -> nn.Module:
    """The one place a backend is chosen. Each backend maps (x_ND, Routing) -> out_ND and owns `.mlp`."""
    backend = resolve_moe_backend(ffn_config.moe_backend)
    if backend == "torch":
        return TorchExperts(d_model, ffn_config)
    if backend == "megablocks":
        raise NotImplementedError(
            "the megablocks MoE backend is not implemented yet; set ffn_config.moe_backend to 'torch'"
        )
    raise ValueError(f"ffn_config.moe_backend must be one of auto|torch|megablocks, got {backend!r}")


class MoEOutput(NamedTuple):
    out_ND: torch.Tensor
    aux_loss: torch.Tensor  # 0-dim fp32 load-balancing loss of this layer, unweighted
    router_logits_NE: torch.Tensor


class DbrxFFN(nn.Module):
    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig):
        super().__init__()
        self.router = DbrxRouter(d_model, ffn_config)
        self.experts = build_experts(d_model, ffn_config)

    def forward(self, x_ND: torch.Tensor) -> MoEOutput:
        routing = self.router(x_ND)
        out_ND = self.experts(x_ND, routing)
        aux_loss = load_balancing_loss(routing.probs_NE, routing.experts_Nk)
        return MoEOutput(out_ND, aux_loss, routing.logits_NE)
