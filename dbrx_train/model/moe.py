"""Mixture-of-experts FFN: router + dropless experts + router losses (load balancing, z-loss).

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

The torch backend runs gather -> expert_glu -> combine as one autograd.Function, `fused_experts`,
whose hand-written backward saves less and copies less than autograd through the three steps (see
its docstring); the steps themselves stay the readable reference it is tested against.

The experts' backend (`TorchBackend` on any device; `MegaBlocksBackend` on CUDA) is chosen once per
model from `ffn_config.moe_backend` (`resolve_moe_backend`), and every layer builds its experts with
that object. Every backend keeps its parameters in the same `ExpertGLU` (`mlp.w1`, `mlp.v1`,
`mlp.w2`, each (E*F, D) as in HF DBRX) so checkpoints move between backends. Routing (`DbrxRouter`, `route`) and the
router losses are shared by every backend. The losses are returned with the FFN output, so they flow
through autograd and module outputs, never through a global list.

Router statistics count only the tokens `token_mask_N` marks (padding, and optionally prompts, are
left out; see `DbrxForCausalLM`). Over which tokens the balancing loss is taken is the caller's
choice: this forward's own (`totals=None`), or the whole optimizer step's, whose per-expert counts
training/ sums over microbatches and ranks and hands in as `StepTotals` (moe_loss_scope: global).
The model itself never communicates.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
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
    expert_bias_E: torch.Tensor | None = None,
) -> Routing:
    """Pick top_k experts per token. Pass `jitter_eps` only while training (0 or None: no jitter).
    `expert_bias_E` (bias balancing, DeepSeek-V3) shifts which experts are chosen, never the weights
    they are mixed with."""
    if jitter_eps:
        # Multiplicative noise on the router's input only (as MegaBlocks); the experts see clean x.
        noise_ND = torch.empty_like(x_ND).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
        x_ND = x_ND * noise_ND
    logits_NE = F.linear(x_ND, router_ED)
    # fp32 softmax: bf16 probabilities are too coarse to rank 16 experts reliably.
    probs_NE = logits_NE.softmax(dim=-1, dtype=torch.float32)
    if expert_bias_E is None:
        weights_Nk, experts_Nk = torch.topk(probs_NE, top_k, dim=-1)
    else:
        experts_Nk = torch.topk(probs_NE + expert_bias_E, top_k, dim=-1).indices
        weights_Nk = probs_NE.gather(-1, experts_Nk)
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
# Steps 3-5 fused: the torch backend's fast path
# ---------------------------------------------------------------------------------------------
# d act(h) / dh times a gradient, for the activations `fused_experts` differentiates by hand.
ACTIVATION_BACKWARD: dict[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F.silu: lambda grad, h: torch.ops.aten.silu_backward(grad, h),
    F.gelu: lambda grad, h: torch.ops.aten.gelu_backward(grad, h),  # exact (erf), as F.gelu
    F.relu: lambda grad, h: grad.masked_fill(h <= 0, 0.0),
}


class _FusedExperts(torch.autograd.Function):
    """gather -> expert_glu -> combine with a hand-written backward; see `fused_experts`."""

    @staticmethod
    def forward(ctx, x_ND, weights_Nk, w1_EFD, v1_EFD, w2_EFD, order_M, tokens_per_expert, act):
        top_k = weights_Nk.shape[-1]
        token_M = order_M // top_k
        x_MD = x_ND.index_select(0, token_M)  # freed after forward; backward gathers again
        weight_M = weights_Nk.reshape(-1).index_select(0, order_M).to(x_ND.dtype)
        M, D = x_MD.shape
        h1_MF = x_MD.new_empty(M, w1_EFD.shape[1])  # gate pre-activation
        h2_MF = torch.empty_like(h1_MF)  # up projection
        y_MD = x_MD.new_empty(M, D)
        start = 0
        for e, rows in enumerate(tokens_per_expert):
            if rows == 0:
                continue
            sl = slice(start, start + rows)
            start += rows
            x_e = x_MD[sl]
            torch.mm(x_e, w1_EFD[e].t(), out=h1_MF[sl])
            torch.mm(x_e, v1_EFD[e].t(), out=h2_MF[sl])
            torch.mm(act(h1_MF[sl]) * h2_MF[sl], w2_EFD[e], out=y_MD[sl])
        out_ND = x_ND.new_zeros(x_ND.shape)
        out_ND.index_add_(0, token_M, y_MD.mul_(weight_M[:, None]))
        ctx.save_for_backward(x_ND, weight_M, w1_EFD, v1_EFD, w2_EFD, order_M, h1_MF, h2_MF)
        ctx.tokens_per_expert, ctx.act, ctx.weights_shape = tokens_per_expert, act, weights_Nk.shape
        ctx.weights_dtype = weights_Nk.dtype
        return out_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout_ND):
        x_ND, weight_M, w1_EFD, v1_EFD, w2_EFD, order_M, h1_MF, h2_MF = ctx.saved_tensors
        act, act_backward = ctx.act, ACTIVATION_BACKWARD[ctx.act]
        need_x, need_weights, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:5]
        top_k = ctx.weights_shape[-1]
        token_M = order_M // top_k
        x_MD = x_ND.index_select(0, token_M)
        dout_MD = dout_ND.index_select(0, token_M)  # gradient reaching each assignment, unweighted
        dx_MD = torch.empty_like(x_MD) if need_x else None
        dweight_M = weight_M.new_empty(weight_M.shape) if need_weights else None
        # Experts without rows run no matmul, so their gradient slices must start at zero.
        alloc = torch.zeros_like if 0 in ctx.tokens_per_expert else torch.empty_like
        dw1 = alloc(w1_EFD) if need_w1 else None
        dv1 = alloc(v1_EFD) if need_v1 else None
        dw2 = alloc(w2_EFD) if need_w2 else None
        start = 0
        for e, rows in enumerate(ctx.tokens_per_expert):
            if rows == 0:
                continue
            sl = slice(start, start + rows)
            start += rows
            x_e, h1_e, h2_e, dout_e, w_e1 = x_MD[sl], h1_MF[sl], h2_MF[sl], dout_MD[sl], weight_M[sl, None]
            g_e = act(h1_e)
            glu_e = g_e * h2_e  # (rows, F), recomputed rather than saved
            dz_e = dout_e @ w2_EFD[e].t()  # d out / d glu, before the routing weight
            if need_weights:
                # d out / d weight_m = <dout_m, glu_m @ w2_e> = <dz_m, glu_m>: no second w2 matmul.
                torch.sum(dz_e * glu_e, dim=-1, out=dweight_M[sl])
            if need_w2:
                torch.mm(glu_e.mul_(w_e1).t(), dout_e, out=dw2[e])
            dglu_e = dz_e.mul_(w_e1)
            dh1_e = act_backward(dglu_e * h2_e, h1_e)
            dh2_e = dglu_e.mul_(g_e)
            if need_w1:
                torch.mm(dh1_e.t(), x_e, out=dw1[e])
            if need_v1:
                torch.mm(dh2_e.t(), x_e, out=dv1[e])
            if need_x:
                torch.mm(dh1_e, w1_EFD[e], out=dx_MD[sl])
                dx_MD[sl].addmm_(dh2_e, v1_EFD[e])
        dx_ND = x_ND.new_zeros(x_ND.shape).index_add_(0, token_M, dx_MD) if need_x else None
        dweights_Nk = None
        if need_weights:
            dweights_flat = dweight_M.new_empty(weight_M.shape).index_copy_(0, order_M, dweight_M)
            dweights_Nk = dweights_flat.view(ctx.weights_shape).to(ctx.weights_dtype)
        return dx_ND, dweights_Nk, dw1, dv1, dw2, None, None, None


def fused_experts(
    x_ND: torch.Tensor,
    weights_Nk: torch.Tensor,
    bins: ExpertBins,
    tokens_per_expert: list[int],
    w1_EFD: torch.Tensor,
    v1_EFD: torch.Tensor,
    w2_EFD: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`combine(expert_glu(gather(x)), ...)` in one step, equal to it up to float summation order.

    Same matmuls as the steps (one per weight per expert with rows); what differs is backward:
    - memory: per layer it keeps only the two pre-activations h1, h2 (M, F) besides its inputs;
      autograd through the steps keeps the gathered x (M, D), act(h1), the GLU product (both M, F)
      and the expert output (M, D) too. The gathered x is gathered again in backward, the GLU
      product recomputed (elementwise);
    - copies: matmuls write straight into slices of one buffer (`out=`), so no torch.cat of expert
      outputs and no stack of E per-expert gradients into each (E*F, D) weight gradient (three
      weight-sized copies per layer per step, the largest non-matmul cost of the steps on CPU);
    - the routing weights' gradient comes from the w2 backward matmul's output, not a second pass.
    Activations other than silu, gelu and relu fall back to the steps.
    """
    if act not in ACTIVATION_BACKWARD:
        x_MD = gather(x_ND, bins.order_M, weights_Nk.shape[-1])
        y_MD = expert_glu(x_MD, tokens_per_expert, w1_EFD, v1_EFD, w2_EFD, act)
        return combine(y_MD, bins, weights_Nk, x_ND.shape[0])
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside an autograd.Function: cast as it would for the matmuls.
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w1_EFD, v1_EFD, w2_EFD = (t.to(dtype) for t in (x_ND, w1_EFD, v1_EFD, w2_EFD))
        with torch.autocast(device_type, enabled=False):
            return _FusedExperts.apply(
                x_ND, weights_Nk, w1_EFD, v1_EFD, w2_EFD, bins.order_M, tokens_per_expert, act
            )
    return _FusedExperts.apply(x_ND, weights_Nk, w1_EFD, v1_EFD, w2_EFD, bins.order_M, tokens_per_expert, act)


# ---------------------------------------------------------------------------------------------
# Router statistics and losses (over the counted tokens)
# ---------------------------------------------------------------------------------------------
class StepTotals(NamedTuple):
    """One layer's routing over the whole optimizer step (moe_loss_scope: global): every microbatch
    on every rank, summed by training/ before the step's first forward."""

    counts_E: torch.Tensor  # int64 assignments per expert, counted tokens only
    tokens: torch.Tensor  # int64 0-dim: counted tokens in the step
    # 1 / (this forward's share of the step's samples). Trainers average the microbatch losses by
    # sample share (and data-parallel ranks by their mean), so a microbatch's part of a step-wide sum
    # is handed over divided by its share: the step's gradient is then that of the step-wide loss.
    weight: float


class RouterStats(NamedTuple):
    """One layer's routing of the counted tokens in one forward, for monitoring and for the step
    totals; no gradient."""

    counts_E: torch.Tensor  # int64 assignments per expert
    probs_E: torch.Tensor  # fp32 sum of the router probabilities per expert
    entropy: torch.Tensor  # fp32 0-dim sum of per-token router entropies (nats)
    tokens: torch.Tensor  # int64 0-dim counted tokens


def counted_assignments(
    experts_Nk: torch.Tensor, token_mask_N: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """int64 (E,) top-k assignments per expert of the tokens `token_mask_N` marks (all if None)."""
    experts_M = experts_Nk.reshape(-1)
    if token_mask_N is None:
        return torch.bincount(experts_M, minlength=num_experts)
    # Uncounted assignments go to a spare bin E: no boolean indexing, so no host sync.
    mask_M = token_mask_N.repeat_interleave(experts_Nk.shape[-1])
    return torch.bincount(experts_M.where(mask_M, num_experts), minlength=num_experts + 1)[:num_experts]


def _masked_sum(values_N: torch.Tensor, token_mask_N: torch.Tensor | None) -> torch.Tensor:
    """Sum over dim 0 of the counted rows (values_N: (N,) or (N, E))."""
    if token_mask_N is None:
        return values_N.sum(0)
    mask = token_mask_N.to(values_N.dtype)
    return (values_N * (mask if values_N.dim() == 1 else mask[:, None])).sum(0)


def _token_count(token_mask_N: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    if token_mask_N is None:
        return torch.tensor(num_tokens, device=device)
    return token_mask_N.sum()


def load_balancing_loss(
    probs_NE: torch.Tensor,
    experts_Nk: torch.Tensor,
    token_mask_N: torch.Tensor | None = None,
    totals: StepTotals | None = None,
) -> torch.Tensor:
    """Switch Transformer / MegaBlocks loss of one layer: E * sum_e f_e * P_e.

    f_e: fraction of the top-k assignments routed to e (no gradient); P_e: mean router probability of
    e over tokens. Equals 1 when routing is uniform. Both are taken over the tokens `token_mask_N`
    marks (padding never counts), of this forward, or with `totals` of the whole step: f from the
    step's counts, P as this forward's part of the step's mean (see StepTotals.weight). Note
    transformers' DBRX loss differs: it pools all layers before the product and its f_e is a fraction
    of N (not N*k), so it is k times larger.
    """
    num_experts, top_k = probs_NE.shape[-1], experts_Nk.shape[-1]
    if totals is None:
        counts_E = counted_assignments(experts_Nk, token_mask_N, num_experts)
        tokens, weight = _token_count(token_mask_N, probs_NE.shape[0], probs_NE.device), 1.0
    else:
        counts_E, tokens, weight = totals
    # clamp: a forward (or step) without a counted token has no loss rather than a NaN.
    tokens = tokens.clamp_min(1).to(torch.float32)
    f_E = counts_E.to(torch.float32) / (tokens * top_k)
    P_E = _masked_sum(probs_NE.float(), token_mask_N) / tokens
    return num_experts * weight * torch.dot(f_E, P_E)


def router_z_loss(
    logits_NE: torch.Tensor, token_mask_N: torch.Tensor | None = None, totals: StepTotals | None = None
) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over the counted tokens of logsumexp(logits)^2, in fp32. It keeps
    router logits small (large ones make the softmax brittle in low precision)."""
    z_N = torch.logsumexp(logits_NE.float(), dim=-1).square()
    if totals is None:
        tokens, weight = _token_count(token_mask_N, logits_NE.shape[0], logits_NE.device), 1.0
    else:
        tokens, weight = totals.tokens, totals.weight
    return weight * _masked_sum(z_N, token_mask_N) / tokens.clamp_min(1).to(torch.float32)


@torch.no_grad()
def router_stats(routing: Routing, token_mask_N: torch.Tensor | None = None) -> RouterStats:
    probs_NE = routing.probs_NE
    entropy_N = -(probs_NE * probs_NE.clamp_min(1e-30).log()).sum(-1)
    return RouterStats(
        counts_E=counted_assignments(routing.experts_Nk, token_mask_N, probs_NE.shape[-1]),
        probs_E=_masked_sum(probs_NE, token_mask_N),
        entropy=_masked_sum(entropy_N, token_mask_N),
        tokens=_token_count(token_mask_N, probs_NE.shape[0], probs_NE.device),
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
EXPERT_BIAS = "expert_bias"  # the router buffer of bias balancing; no HF DBRX tensor holds it


class DbrxRouter(nn.Module):
    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig):
        super().__init__()
        self.top_k = ffn_config.moe_top_k
        self.normalize_p = ffn_config.moe_normalize_expert_weights
        self.jitter_eps = ffn_config.moe_jitter_eps
        self.uniform_assignment = ffn_config.uniform_expert_assignment
        self.layer = nn.Linear(d_model, ffn_config.moe_num_experts, bias=False)
        # Bias balancing: state, not a parameter (no gradient; training/ moves it after each step and
        # keeps it equal on every rank). Only with moe_bias_update_rate > 0, so other models' state
        # dicts hold exactly HF DBRX's tensors.
        bias = torch.zeros(ffn_config.moe_num_experts) if ffn_config.moe_bias_update_rate > 0 else None
        self.register_buffer(EXPERT_BIAS, bias)

    def forward(self, x_ND: torch.Tensor) -> Routing:
        return route(
            x_ND,
            self.layer.weight,
            self.top_k,
            normalize_p=self.normalize_p,
            jitter_eps=self.jitter_eps if self.training else None,
            uniform_assignment=self.uniform_assignment,
            expert_bias_E=self.expert_bias,
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
        # The one host sync of the layer: E slice lengths, needed to slice the sorted rows.
        tokens_per_expert = bins.tokens_per_expert_E.tolist()
        w1, v1, w2 = mlp.per_expert(mlp.w1), mlp.per_expert(mlp.v1), mlp.per_expert(mlp.w2)
        return fused_experts(x_ND, routing.weights_Nk, bins, tokens_per_expert, w1, v1, w2, mlp.act)


class MegaBlocksKernels(NamedTuple):
    """The MegaBlocks and grouped_gemm functions the megablocks backend calls (CUDA only)."""

    sort: Callable  # (int32 ids, end_bit) -> (sorted ids, their positions); stable radix sort
    histogram: Callable  # (int32 ids, num_bins) -> int32 counts
    inclusive_cumsum: Callable  # (counts, dim) -> running totals
    gather: Callable  # (x_ND, indices, bin_ids, bins, top_k) -> x_MD in expert order
    scatter: Callable  # (y_MD, indices, bin_ids, weights_M, bins, top_k) -> weighted sum over k, out_ND
    gmm: Callable  # grouped_gemm.ops.gmm(a, b_EXY, batch_sizes on CPU, trans_b): one GEMM per expert


def load_megablocks_kernels() -> MegaBlocksKernels:
    """Import MegaBlocks lazily: the [gpu] extra is never needed on CPU machines or in tests."""
    try:
        import grouped_gemm.ops as grouped_gemm_ops
        import megablocks.ops as megablocks_ops
    except ImportError as error:  # also the compiled parts (megablocks_ops, grouped_gemm_backend)
        raise ImportError(
            f"ffn_config.moe_backend is 'megablocks' but MegaBlocks could not be imported ({error}); "
            "run `pip install --no-build-isolation -e .[gpu]` on a CUDA machine (it compiles CUDA code with nvcc), "
            "or set ffn_config.moe_backend to 'torch'"
        ) from error
    return MegaBlocksKernels(
        sort=megablocks_ops.sort,
        histogram=megablocks_ops.histogram,
        inclusive_cumsum=megablocks_ops.inclusive_cumsum,
        gather=megablocks_ops.gather,
        scatter=megablocks_ops.scatter,
        gmm=grouped_gemm_ops.gmm,
    )


class MegaBlocksExperts(TorchExperts):
    """Dropless experts on MegaBlocks' CUDA kernels: the grouped path of its dMoE (`mlp_impl: grouped`).

    The same steps as the torch backend, with MegaBlocks' kernels: radix sort + histogram + cumsum
    (indices and bins), a Triton gather, three grouped GEMMs (grouped_gemm: one launch per weight for
    all experts), and a Triton scatter that applies the routing weights and sums each token's top_k
    rows. The parameters are the torch backend's `ExpertGLU`, so checkpoints move between backends;
    router and load-balancing loss stay in `DbrxFFN`, identical for both backends (nothing goes into
    MegaBlocks' global loss list, so there is nothing to clear between steps).

    grouped_gemm computes in bf16 only: the experts run in bf16 under autocast (`precision:
    amp_bf16`) or with bf16 parameters (FSDP's mixed precision). A call the kernels cannot take (see
    `MegaBlocksBackend.unsupported`) is an error when the backend was asked for by name, and runs the
    torch backend's code on the same parameters when it was chosen by "auto" (`torch_fallback`).
    """

    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig, backend: MegaBlocksBackend):
        super().__init__(d_model, ffn_config)
        self.backend = backend
        self.kernels = backend.kernels
        # Bits the radix sort needs for expert ids (as MegaBlocks' `sort_end_bit`).
        self.sort_end_bit = max(math.ceil(math.log2(ffn_config.moe_num_experts)), 1)

    @staticmethod
    def compute_dtype(x_ND: torch.Tensor) -> torch.dtype:
        device_type = x_ND.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_ND.dtype

    def forward(self, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        dtype = self.compute_dtype(x_ND)
        why_not = self.backend.unsupported(x_ND.device.type, dtype)
        if why_not is None:
            return self.megablocks_forward(x_ND, routing, dtype)
        if not self.backend.torch_fallback:
            raise ValueError(
                f"ffn_config.moe_backend: megablocks {why_not}, got {dtype} on {x_ND.device.type}: train with "
                "precision amp_bf16 on a GPU, or use moe_backend torch"
            )
        return super().forward(x_ND, routing)

    def megablocks_forward(self, x_ND: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
        mlp, ops = self.mlp, self.kernels
        top_k = routing.experts_Nk.shape[-1]
        device_type = x_ND.device.type
        with torch.no_grad():
            experts_M = routing.experts_Nk.reshape(-1).int()
            bin_ids_M, indices_M = ops.sort(experts_M, self.sort_end_bit)
            tokens_per_expert_E = ops.histogram(experts_M, mlp.num_experts)
            bins_E = ops.inclusive_cumsum(tokens_per_expert_E, 0).view(-1)  # 0-dim when E == 1
            # The layer's one host sync, as in MegaBlocks: grouped_gemm takes the sizes on the CPU.
            batch_sizes_E = tokens_per_expert_E.cpu().to(torch.int64)
        with torch.autocast(device_type, enabled=False):
            x_ND = x_ND.to(dtype).contiguous()
            w1, v1, w2 = (mlp.per_expert(w).to(dtype) for w in (mlp.w1, mlp.v1, mlp.w2))
            x_MD = ops.gather(x_ND, indices_M, bin_ids_M, bins_E, top_k)
            h1_MF = ops.gmm(x_MD, w1, batch_sizes_E, trans_b=True)  # gate
            h2_MF = ops.gmm(x_MD, v1, batch_sizes_E, trans_b=True)  # up
            y_MD = ops.gmm(mlp.act(h1_MF) * h2_MF, w2, batch_sizes_E)  # down: w2_e used as (F, D)
            weights_M = routing.weights_Nk.reshape(-1).to(dtype)  # in token order, as the scatter reads
            return ops.scatter(y_MD, indices_M, bin_ids_M, weights_M, bins_E, top_k)


# ---------------------------------------------------------------------------------------------
# Backends: `moe_backend` is read once per model (`resolve_moe_backend`); every layer gets the object
# ---------------------------------------------------------------------------------------------
class TorchBackend:
    """Dropless experts in plain PyTorch (`TorchExperts`): exact on any device, in any dtype."""

    name = "torch"
    torch_fallback = True  # the torch code is this backend: expert parallelism and LoRA run it as it is

    def experts(self, d_model: int, ffn_config: DbrxFFNConfig) -> TorchExperts:
        return TorchExperts(d_model, ffn_config)

    def unsupported(self, device_type: str, dtype: torch.dtype) -> str | None:
        return None

    def __repr__(self) -> str:
        return "torch (plain PyTorch, any device and dtype)"


class MegaBlocksBackend:
    """MegaBlocks' CUDA kernels (`MegaBlocksExperts`). `torch_fallback` (chosen by "auto"): calls the
    kernels cannot take, and expert parallelism, run the torch backend's code on the same parameters;
    False (asked for by name): they are an error."""

    name = "megablocks"

    def __init__(self, torch_fallback: bool):
        self.torch_fallback = torch_fallback

    @functools.cached_property
    def kernels(self) -> MegaBlocksKernels:
        """Imported when the first layer is built, not when the backend is chosen: a config can be
        checked for a GPU run on a machine without the [gpu] extra."""
        return load_megablocks_kernels()

    def experts(self, d_model: int, ffn_config: DbrxFFNConfig) -> MegaBlocksExperts:
        return MegaBlocksExperts(d_model, ffn_config, self)

    def unsupported(self, device_type: str, dtype: torch.dtype) -> str | None:
        """Why the kernels cannot take a call on this device in this compute dtype (None: they can)."""
        if device_type != "cuda":
            return "runs CUDA kernels only"
        if dtype != torch.bfloat16:
            return "computes the experts in bf16 only (grouped_gemm has no other dtype)"
        return None

    def __repr__(self) -> str:
        if self.torch_fallback:
            return "megablocks (MegaBlocks' kernels for bf16 on CUDA, the torch code for other calls)"
        return "megablocks (MegaBlocks' kernels, bf16 on CUDA only)"


MoEBackend = TorchBackend | MegaBlocksBackend


@functools.cache  # one import attempt (and at most one warning) per process, not one per layer
def megablocks_import_error() -> str | None:
    """Why the megablocks backend cannot load here (None: it can). Not installed is the usual case;
    an installed but broken build (say, compiled for another torch) is worth a warning."""
    try:
        load_megablocks_kernels()
    except ImportError as error:
        reason = str(error.__cause__ or error)
        if importlib.util.find_spec("megablocks") is not None:
            logging.getLogger(__name__).warning(
                "MegaBlocks is installed but does not import (%s); moe_backend auto uses the torch backend",
                reason,
            )
        return reason
    return None


def resolve_moe_backend(requested: str, device_type: str | None = None) -> MoEBackend:
    """The one place `ffn_config.moe_backend` is read: the backend a model on `device_type` ("cuda" or
    "cpu"; None: CUDA when this machine has it) runs. "auto" is megablocks on CUDA when the [gpu]
    extra imports (its agreement tests passed on an H200, docs/performance.md), else torch;
    "megablocks" by name needs CUDA (and the [gpu] extra, imported when the first layer is built)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "torch":
        return TorchBackend()
    if requested == "auto":
        usable = device_type == "cuda" and megablocks_import_error() is None
        return MegaBlocksBackend(torch_fallback=True) if usable else TorchBackend()
    if requested == "megablocks":
        if device_type != "cuda":
            raise ValueError(
                f"ffn_config.moe_backend: megablocks runs CUDA kernels, but the model is on {device_type}; "
                "use torch (or auto)"
            )
        return MegaBlocksBackend(torch_fallback=False)
    raise ValueError(f"ffn_config.moe_backend must be one of auto|torch|megablocks; got {requested!r}")


class MoEOutput(NamedTuple):
    out_ND: torch.Tensor
    aux_loss: torch.Tensor  # 0-dim fp32 load-balancing loss of this layer, unweighted
    router_logits_NE: torch.Tensor
    z_loss: torch.Tensor  # 0-dim fp32 router z-loss of this layer, unweighted (0 when its weight is 0)
    stats: RouterStats  # the routing of the counted tokens, for monitoring and step totals


class DbrxFFN(nn.Module):
    def __init__(self, d_model: int, ffn_config: DbrxFFNConfig, backend: MoEBackend):
        super().__init__()
        self.with_z_loss = ffn_config.moe_z_loss_weight > 0
        self.router = DbrxRouter(d_model, ffn_config)
        self.experts = backend.experts(d_model, ffn_config)

    def forward(
        self, x_ND: torch.Tensor, token_mask_N: torch.Tensor | None = None, totals: StepTotals | None = None
    ) -> MoEOutput:
        """Every token goes through the experts (dropless); only those `token_mask_N` marks (None:
        all) count in the router losses and statistics, over this forward or, with `totals`, the step."""
        routing = self.router(x_ND)
        out_ND = self.experts(x_ND, routing)
        aux_loss = load_balancing_loss(routing.probs_NE, routing.experts_Nk, token_mask_N, totals)
        if self.with_z_loss:
            z_loss = router_z_loss(routing.logits_NE, token_mask_N, totals)
        else:
            z_loss = aux_loss.new_zeros(())
        stats = router_stats(routing, token_mask_N)
        return MoEOutput(out_ND, aux_loss, routing.logits_NE, z_loss, stats)
