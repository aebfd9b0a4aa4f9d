"""CPU benchmarks of the model and its MoE layer against peers measured in the same process.

Peers: transformers' DbrxForCausalLM / DbrxFFN (per-expert loop over routed tokens) with our
weights copied in (parameter names are equal), a dense GLU with the MoE's active FLOPs, and our own
unfused MoE steps (gather -> expert_glu -> combine through autograd; the torch backend before it
was fused). Every figure is a ratio of peers timed interleaved (see bench_timing).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from bench_timing import Timing, interleaved

from dbrx_train.config.schema import build
from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model import moe as moe_lib
from dbrx_train.model.compile import compile_regions
from dbrx_train.model.stats import flops_per_token


class Shape(NamedTuple):
    """One benchmark setting: model size and the batch it trains on."""

    d_model: int
    n_heads: int
    kv_n_heads: int
    n_layers: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    vocab_size: int
    batch: int
    seq_len: int

    def config(self, moe_backend: str = "torch") -> DbrxConfig:
        return build(
            DbrxConfig,
            {
                "d_model": self.d_model,
                "n_heads": self.n_heads,
                "n_layers": self.n_layers,
                "max_seq_len": self.seq_len,
                "vocab_size": self.vocab_size,
                "attn_config": {"kv_n_heads": self.kv_n_heads, "clip_qkv": 8.0, "rope_theta": 500000.0},
                "ffn_config": {
                    "ffn_hidden_size": self.ffn_hidden_size,
                    "moe_num_experts": self.num_experts,
                    "moe_top_k": self.top_k,
                    "moe_backend": moe_backend,
                },
            },
        )

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


# The MoE-focused mid-size config: DBRX's proportions (16 experts top-4, F = 1.75 D, GQA) at
# d_model 512. Vocabulary 8192 so the MoE, not lm_head, dominates; VOCAB_REAL adds DBRX's 100352.
MID = Shape(512, 8, 2, 4, 896, 16, 4, 8192, 4, 256)
VOCAB_REAL = 100352
TOY = Shape(64, 4, 2, 2, 96, 8, 2, 512, 2, 32)  # the smoke test's size


def build_ours(shape: Shape, seed: int = 0) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    return DbrxForCausalLM(shape.config()).train()


def build_hf_like(ours: DbrxForCausalLM) -> torch.nn.Module:
    """transformers' DbrxForCausalLM (sdpa attention) holding our model's weights."""
    import transformers  # here, so the memory subprocess measuring ours never loads it

    hf_config = transformers.DbrxConfig(**ours.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    hf = transformers.DbrxForCausalLM(hf_config)
    hf.load_state_dict(ours.state_dict())
    return hf.train()


def build_pair(shape: Shape, seed: int = 0) -> tuple[DbrxForCausalLM, torch.nn.Module]:
    ours = build_ours(shape, seed)
    return ours, build_hf_like(ours)


def batch_of(shape: Shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=gen)


def autocast(dtype: torch.dtype | None):
    """CPU autocast to `dtype` as Composer's amp_bf16 runs it (forward and loss; backward outside),
    or nothing for fp32."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    optimizer: bool = True,
    dtype: torch.dtype | None = None,
    **inputs: torch.Tensor,
) -> Callable[[], None]:
    """fwd + bwd (+ AdamW step): the same optimizer for every model, torch's fused CPU AdamW, the
    fastest one here, so the optimizer (identical work for both) dilutes the ratio least. `dtype`:
    the autocast dtype (bf16), None for fp32; the weights and the optimizer stay fp32 either way.
    `inputs`: more model inputs (sequence_id)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True) if optimizer else None

    def step() -> None:
        with autocast(dtype):
            loss = model(input_ids, labels=input_ids, **inputs).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None

    return step


def matmul_peer(
    n: int = 2048, calls: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], None], float]:
    """`calls` n x n matmuls in `dtype` and their FLOPs: the peak peer, timed in the same loop as the
    steps so that the MFU denominator sees the same machine load as the numerator."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

    def fn() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return fn, 2.0 * n**3 * calls


class TrainResult(NamedTuple):
    shape: Shape
    ours: Timing
    hf: Timing
    unfused: Timing | None  # our model with the unfused MoE steps, when asked for
    compiled: Timing  # our model with compile_config's default region (the loss) compiled
    flops_per_step: float
    peak_flops: float  # of the matmul peer, fastest repetition


def bench_train_step(
    shape: Shape, reps: int, matmul_n: int = 2048, with_unfused: bool = False, seed: int = 0
) -> TrainResult:
    ours, hf = build_pair(shape, seed)
    x = batch_of(shape)
    peak_fn, peak_work = matmul_peer(matmul_n)
    compiled = build_ours(shape, seed)
    compiled.load_state_dict(ours.state_dict())
    compile_regions(compiled, ["loss"])  # compiles in the untimed warm-up call
    fns = {"ours": train_step(ours, x), "hf": train_step(hf, x), "ours compiled": train_step(compiled, x)}
    fns["matmul"] = peak_fn
    if with_unfused:
        unfused = build_ours(shape)
        for block in unfused.transformer.blocks:
            block.ffn.experts.forward = unfused_forward(block.ffn.experts)
        fns["unfused"] = train_step(unfused, x)
    t = interleaved(fns, reps=reps, warmup=1)
    flops = flops_per_token(ours.config, shape.seq_len) * shape.tokens
    peak = peak_work / t["matmul"].low
    return TrainResult(shape, t["ours"], t["hf"], t.get("unfused"), t["ours compiled"], flops, peak)


class Bf16TrainResult(NamedTuple):
    init: str  # whose initialisation the shared weights come from: "ours" or "transformers"
    ours: Timing
    hf: Timing
    flops_per_step: float
    peak_flops: float  # of the bf16 matmul peer, fastest repetition
    expert_imbalance: float  # busiest expert's rows / the mean, over the MoE layers (1 = balanced)
    losses: tuple[float, float]  # ours, transformers: first loss, same weights and batch


def build_pair_initialised_by(
    shape: Shape, init: str, seed: int = 0
) -> tuple[DbrxForCausalLM, torch.nn.Module]:
    """Both models with the same weights, drawn by our init_weights or by transformers' _init_weights.

    The two route differently: ours scales the residual projections by 1/sqrt(2 n_layers), so the
    router sees other inputs and the experts' row counts (the GEMM shapes) differ."""
    if init == "ours":
        return build_pair(shape, seed)
    import transformers

    ours = build_ours(shape, seed)
    hf_config = transformers.DbrxConfig(**ours.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = transformers.DbrxForCausalLM(hf_config).train()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def expert_imbalance(model: DbrxForCausalLM, input_ids: torch.Tensor) -> float:
    """Mean over layers of max(rows per expert) / mean(rows per expert) for this batch."""
    ratios = []

    def record(module, args, routing) -> None:
        counts = torch.bincount(routing.experts_Nk.reshape(-1), minlength=module.layer.out_features)
        ratios.append(counts.max().item() / counts.float().mean().item())

    hooks = [block.ffn.router.register_forward_hook(record) for block in model.transformer.blocks]
    with torch.no_grad(), autocast(torch.bfloat16):
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return sum(ratios) / len(ratios)


def bench_train_step_bf16(
    shape: Shape, reps: int, init: str = "ours", matmul_n: int = 2048, seed: int = 0
) -> Bf16TrainResult:
    """Ours and transformers, each a bf16-autocast step over fp32 weights (Composer's amp_bf16), and
    a bf16 matmul peer for MFU, interleaved."""
    bf16 = torch.bfloat16
    ours, hf = build_pair_initialised_by(shape, init, seed)
    x = batch_of(shape)
    with torch.no_grad(), autocast(bf16):
        losses = (ours(x, labels=x).loss.item(), hf(x, labels=x).loss.item())
    imbalance = expert_imbalance(ours, x)
    peak_fn, peak_work = matmul_peer(matmul_n, dtype=bf16)
    fns = {"ours": train_step(ours, x, dtype=bf16), "hf": train_step(hf, x, dtype=bf16), "matmul": peak_fn}
    t = interleaved(fns, reps=reps, warmup=1)
    flops = flops_per_token(ours.config, shape.seq_len) * shape.tokens
    peak = peak_work / t["matmul"].low
    return Bf16TrainResult(init, t["ours"], t["hf"], flops, peak, imbalance, losses)


# ---------------------------------------------------------------------------------------------
# The MoE layer alone
# ---------------------------------------------------------------------------------------------
class DenseGLU(torch.nn.Module):
    """A dense GLU MLP of hidden top_k * F: the MoE's active expert FLOPs without routing."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(hidden, d_model) * 0.02)
        self.v1 = torch.nn.Parameter(torch.randn(hidden, d_model) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, d_model) * 0.02)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (F.silu(x_ND @ self.w1.t()) * (x_ND @ self.v1.t())) @ self.w2


def unfused_forward(experts: moe_lib.TorchExperts) -> Callable:
    """The torch backend before fusion: the three steps through autograd."""

    def forward(x_ND: torch.Tensor, routing: moe_lib.Routing) -> torch.Tensor:
        mlp = experts.mlp
        bins = moe_lib.sort_by_expert(routing.experts_Nk, mlp.num_experts)
        counts = bins.tokens_per_expert_E.tolist()
        x_MD = moe_lib.gather(x_ND, bins.order_M, routing.experts_Nk.shape[-1])
        w1, v1, w2 = mlp.per_expert(mlp.w1), mlp.per_expert(mlp.v1), mlp.per_expert(mlp.w2)
        y_MD = moe_lib.expert_glu(x_MD, counts, w1, v1, w2, mlp.act)
        return moe_lib.combine(y_MD, bins, routing.weights_Nk, x_ND.shape[0])

    return forward


def moe_layers(shape: Shape, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Our FFN, our unfused steps, transformers' DbrxFFN (same weights) and the dense GLU."""
    ours_model, hf_model = build_pair(shape._replace(n_layers=1), seed)
    ours = ours_model.transformer.blocks[0].ffn
    unfused = moe_lib.DbrxFFN(shape.d_model, ours_model.config.ffn_config, ours_model.moe_backend)
    unfused.load_state_dict(ours.state_dict())
    unfused.experts.forward = unfused_forward(unfused.experts)
    hf = hf_model.transformer.blocks[0].ffn
    dense = DenseGLU(shape.d_model, shape.top_k * shape.ffn_hidden_size)
    return {"ours": ours, "ours unfused": unfused, "hf": hf, "dense GLU": dense}


def layer_step(
    module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None
) -> Callable[[], None]:
    x = x.clone().requires_grad_(True)

    def step() -> None:
        with autocast(dtype):
            out = module(x)
        out = out[0] if isinstance(out, tuple) else out  # MoEOutput / HF's (out, weights)
        out.backward(torch.ones_like(out))
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return step


def bench_moe_layer(
    shape: Shape, reps: int, dtype: torch.dtype | None = None
) -> tuple[dict[str, Timing], float]:
    """Timings, and the max |difference| of the MoE peers' outputs (they must compute the same).
    `dtype`: bf16 runs every peer under bf16 autocast (fp32 weights), as amp_bf16 does."""
    layers = moe_layers(shape)
    if dtype is not None:
        del layers["ours unfused"]  # the fp32 table already shows fused against unfused
    x = torch.randn(shape.batch, shape.seq_len, shape.d_model, generator=torch.Generator().manual_seed(1))
    x_flat = x.view(-1, shape.d_model)
    with torch.no_grad(), autocast(dtype):
        ours = layers["ours"](x_flat).out_ND
        hf = layers["hf"](x)[0].reshape(-1, shape.d_model)
        diffs = [(ours - hf).abs().max().item()]
        if "ours unfused" in layers:
            diffs.append((ours - layers["ours unfused"](x_flat).out_ND).abs().max().item())
    # HF's FFN takes (B, T, D); ours and the dense GLU take (N, D).
    fns = {name: layer_step(m, x if name == "hf" else x_flat, dtype) for name, m in layers.items()}
    return interleaved(fns, reps=reps, warmup=1), max(diffs)


# ---------------------------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------------------------
def bench_seq_scaling(shape: Shape, seq_lens: list[int], reps: int) -> dict[int, dict[str, Timing]]:
    """Train step (fwd+bwd) at a fixed number of tokens per batch while T grows: attention's T^2."""
    out = {}
    for T in seq_lens:
        s = shape._replace(seq_len=T, batch=max(1, shape.tokens // T))
        ours, hf = build_pair(s)
        x = batch_of(s)
        out[T] = interleaved(
            {"ours": train_step(ours, x, optimizer=False), "hf": train_step(hf, x, optimizer=False)},
            reps=reps,
            warmup=1,
        )
    return out


def bench_expert_scaling(shape: Shape, expert_counts: list[int], reps: int) -> dict[int, dict[str, Timing]]:
    """MoE layer fwd+bwd with top_k and F fixed while E grows: same active FLOPs, more, smaller matmuls."""
    out = {}
    for E in expert_counts:
        layers = moe_layers(shape._replace(num_experts=E))
        x = torch.randn(shape.batch, shape.seq_len, shape.d_model, generator=torch.Generator().manual_seed(1))
        fns = {
            "ours": layer_step(layers["ours"], x.view(-1, shape.d_model)),
            "hf": layer_step(layers["hf"], x),
        }
        out[E] = interleaved(fns, reps=reps, warmup=1)
    return out


# ---------------------------------------------------------------------------------------------
# Peak memory of a training step, one fresh subprocess per model
# ---------------------------------------------------------------------------------------------
MEMORY_METHOD = (
    "one fresh subprocess per model (glibc MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to "
    "the OS and RSS follows live memory); after one warm-up step (AdamW state allocated) and "
    "malloc_trim, RSS at rest is read, the high-water mark reset (/proc/self/clear_refs = 5), one "
    "training step run, and VmHWM read: 'step' = VmHWM - rest (activations, gradients, temporaries); "
    "'total' = VmHWM; 'saved' = RSS after forward - rest (what autograd keeps for backward, with the logits)"
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(which: str, shape: Shape, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Runs inside the subprocess: MiB at rest, at the step's peak, and their difference."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build_ours(shape)
    if which == "hf":
        model = build_hf_like(model)  # our copy is freed here: only the measured model stays
    gc.collect()
    x = batch_of(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for measured in (False, True):
        if measured:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            rest = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with autocast(dtype):
            loss = model(x, labels=x).loss
        after_forward = _status_kib("VmRSS")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    peak = _status_kib("VmHWM")
    return {
        "rest_mib": rest / 1024,
        "total_mib": peak / 1024,
        "step_mib": (peak - rest) / 1024,
        "saved_mib": (after_forward - rest) / 1024,
    }


def bench_memory(shape: Shape, threads: int, dtype: torch.dtype | None = None) -> dict[str, dict[str, float]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "BENCH_THREADS": str(threads)}
    here = Path(__file__).resolve().parent
    results = {}
    for which in ("ours", "hf"):
        code = (
            "import torch; "
            f"import sys, json; sys.path.insert(0, {str(here)!r}); import bench_cpu; "
            f"print(json.dumps(bench_cpu.memory_child({which!r}, bench_cpu.Shape(*{list(shape)!r}), {dtype!r})))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def bench_document_masking(shape: Shape, doc_lens: list[int], reps: int) -> dict[str, Timing]:
    """fwd + bwd on the same tokens, as plain causal rows and as rows of packed documents of each
    length (sequence_id: block-diagonal attention, restarting positions; sdpa with a bool mask). No
    optimizer step: it would not change with masking, and one AdamW per peer would hold 4 copies of
    its state (~3 GB more at MID)."""
    model = build_ours(shape)
    x = batch_of(shape)
    fns = {"plain causal": train_step(model, x, optimizer=False)}
    for n in doc_lens:
        seq = (torch.arange(shape.seq_len) // n).expand(shape.batch, -1).contiguous()
        fns[f"documents of {n}"] = train_step(model, x, optimizer=False, sequence_id=seq)
    return interleaved(fns, reps=reps, warmup=1)


def accumulated_step(
    model: DbrxForCausalLM, x: torch.Tensor, microbatches: int, step_wide: bool
) -> Callable[[], None]:
    """fwd + bwd over `microbatches` (gradient accumulation, as Composer weights them); with `step_wide`
    first the routing pass of moe_loss_scope global (a forward without gradients of every microbatch)."""
    from dbrx_train.model.dbrx import RouterTotals

    pieces = x.chunk(microbatches)

    def step() -> None:
        totals = None
        if step_wide:
            with torch.no_grad():
                stats = [model(mb, labels=mb, router_only=True).router_stats for mb in pieces]
            counts = sum(torch.stack([s.counts_E for s in st]) for st in stats)
            totals = RouterTotals(counts, sum(st[0].tokens for st in stats), len(x))
        for mb in pieces:
            (model(mb, labels=mb, router_totals=totals).loss * (len(mb) / len(x))).backward()
        for p in model.parameters():
            p.grad = None

    return step


def balancing_variant(shape: Shape, base: DbrxForCausalLM, **ffn: float) -> DbrxForCausalLM:
    """`base`'s weights under other router-balancing settings (a bias model starts with a zero bias)."""
    config = shape.config()
    config.ffn_config = dataclasses.replace(config.ffn_config, **ffn)
    model = DbrxForCausalLM(config).train()
    model.load_state_dict(base.state_dict(), strict=False)
    return model


def bench_balancing(shape: Shape, microbatches: int, reps: int) -> dict[str, Timing]:
    """The step cost of each router-balancing option against the default (moe_loss_scope microbatch),
    same weights and tokens: global (its routing pass), z-loss 1e-3, bias balancing 1e-3 (top-k on the
    biased probabilities; its update after the step, L x E signs and an all-reduce, is not timed)."""
    model = build_ours(shape)
    x = batch_of(shape)
    z_loss = balancing_variant(shape, model, moe_z_loss_weight=1e-3)
    bias = balancing_variant(shape, model, moe_bias_update_rate=1e-3)
    fns = {
        "microbatch": accumulated_step(model, x, microbatches, step_wide=False),
        "global": accumulated_step(model, x, microbatches, step_wide=True),
        "z-loss": accumulated_step(z_loss, x, microbatches, step_wide=False),
        "bias": accumulated_step(bias, x, microbatches, step_wide=False),
    }
    return interleaved(fns, reps=reps, warmup=1)
