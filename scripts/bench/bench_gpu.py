"""GPU benchmark: training steps of a ~1B-active DBRX, our two MoE backends against transformers.

Peers, each run alone on the GPU with the same weights and the same batch:
- ours, `moe_backend: torch` (per-expert matmul loop, one host sync per layer);
- the same with `compile_config` compiling every region (loss, attention, router);
- ours, `moe_backend: megablocks` (MegaBlocks' gather/scatter + grouped_gemm), when installed;
- transformers' DbrxForCausalLM (sdpa attention, its own expert implementation).
A step is forward + backward + fused AdamW on fp32 parameters under bf16 autocast (what
`precision: amp_bf16` runs). MFU counts model FLOPs (`stats.flops_per_token`: 6 x active matmul
parameters + attention) against two peaks: a bf16 8192^3 matmul timed in the same run, and the
card's nominal dense bf16 peak where known (H100/H200 SXM: 989 TFLOP/s), the usual denominator.

This file imports only torch, `dbrx_train.model` and (optionally) transformers and megablocks, so it
runs on a GPU machine without Composer or Streaming. `--quick` runs a toy size on any device (CPU
included) to check the code paths; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from bench_cpu import TOY, Shape  # Composer-free, like everything this file imports

from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.compile import COMPILE_REGIONS, compile_regions
from dbrx_train.model.stats import count_params, flops_per_token

# DBRX's proportions (16 experts top-4, F = 1.75 D, 4:1 GQA, its 100k vocabulary) at d_model 2048 and
# 8 layers: 1.0B active matmul parameters per token (lm_head included, input embedding not), 3.3B
# parameters in all. fp32 weights, gradients and AdamW state take 53 GB and autocast's bf16 weight
# copies 7 GB, so the batch is 2 x 2048 tokens to leave an 80 GB H100 room for activations and the
# 100k-wide logits (--batch changes it).
GPU_1B = Shape(2048, 16, 4, 8, 3584, 16, 4, 100352, 2, 2048)
QUICK = TOY

NOMINAL_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # dense, SXM; PCIe H100 is lower (756)


class Result(NamedTuple):
    name: str
    seconds: float  # median seconds per step
    first_loss: float
    peak_gib: float  # torch.cuda.max_memory_allocated over the steps (0 on CPU)
    note: str


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak(device: torch.device, n: int, reps: int) -> float:
    """Best bf16 n x n matmul rate, FLOP/s: the MFU denominator measured on this card, now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(3):
        torch.mm(a, b)
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def reference_state(shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights every peer starts from (seed 0), on the CPU."""
    torch.manual_seed(0)
    with torch.device("meta"):
        reference = DbrxForCausalLM(shape.config("torch"))
    reference.to_empty(device=device)
    reference.init_weights()  # on the device: 3.3B normal draws take a while on a CPU
    return {key: value.cpu() for key, value in reference.state_dict().items()}


def build_ours(shape: Shape, moe_backend: str, state: dict[str, torch.Tensor], device) -> torch.nn.Module:
    with torch.device("meta"):
        model = DbrxForCausalLM(shape.config(moe_backend))
    model.to_empty(device=device)
    model.init_weights()  # non-persistent buffers (RoPE); the weights come from `state`
    model.load_state_dict(state)
    return model.train()


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """compile_config with every region (loss, attention, router); compiles during the warm-up steps."""
    compile_regions(model, COMPILE_REGIONS)
    return model


def build_hf(shape: Shape, state: dict[str, torch.Tensor], device) -> torch.nn.Module:
    import transformers

    hf_config = transformers.DbrxConfig(**shape.config("torch").to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.DbrxForCausalLM(hf_config)
    hf.load_state_dict(state)
    return hf.train()


def time_training(
    model: torch.nn.Module, input_ids: torch.Tensor, steps: int, warmup: int
) -> tuple[float, float, float]:
    """(median seconds per step, loss of the first step, peak GiB) for fwd + bwd + fused AdamW."""
    device = input_ids.device
    step = training_step(model, input_ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, first_loss = [], math.nan
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if i == 0:
            first_loss = loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del step  # and its optimizer state
    times.sort()
    return times[len(times) // 2], first_loss, peak


def training_step(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One step (returns its loss): fwd under bf16 autocast (what amp_bf16 runs), bwd, fused AdamW."""
    device_type = input_ids.device.type
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device_type == "cuda")

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def megablocks_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("megablocks") is None or importlib.util.find_spec("grouped_gemm") is None:
        return "megablocks / grouped_gemm not installed (pip install --no-build-isolation -e .[gpu])"
    return None


# --peers names; the table prefixes ours with "ours " and spells "_" as a space
PEERS = ("torch", "compiled", "megablocks", "megablocks_compiled", "transformers")


def run(
    quick: bool = False,
    steps: int = 10,
    batch: int | None = None,
    peers: tuple[str, ...] = PEERS,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not quick and device.type != "cuda":
        raise SystemExit("bench_gpu needs a CUDA device (use --quick to check the code paths on CPU)")
    shape = QUICK if quick else GPU_1B
    if batch is not None:
        shape = shape._replace(batch=batch)
    steps, warmup = (2, 1) if quick else (steps, 3)
    config = shape.config("torch")
    counts = count_params(config)
    fpt = flops_per_token(config, shape.seq_len)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"device: {card}, torch {torch.__version__}, bf16 autocast over fp32 parameters, fused AdamW")
    out(
        f"model: d_model {shape.d_model}, {shape.n_layers} layers, {shape.num_experts} experts top-{shape.top_k}, "
        f"F {shape.ffn_hidden_size}, vocab {shape.vocab_size}: {counts.active / 1e9:.2f}B active "
        f"(input embedding included) of {counts.total / 1e9:.2f}B; batch {shape.batch} x {shape.seq_len} tokens; "
        f"{fpt / 1e9:.2f} GFLOP/token"
    )
    peak = measured_peak(device, 1024 if quick else 8192, 2 if quick else 10)
    nominal = nominal_peak(device)
    out(
        f"peak: bf16 matmul measured {peak / 1e12:.1f} TFLOP/s"
        + (f"; nominal {nominal / 1e12:.1f} TFLOP/s" if nominal else "; no nominal peak for this device")
    )

    state = reference_state(shape, device)  # every peer loads a copy
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=gen).to(device)

    candidates: list[tuple[str, Callable[[], torch.nn.Module] | None, str]] = [
        ("ours torch", lambda: build_ours(shape, "torch", state, device), ""),
        ("ours compiled", lambda: compiled(build_ours(shape, "torch", state, device)), ""),
        (
            "ours megablocks",
            lambda: build_ours(shape, "megablocks", state, device),
            megablocks_skip_reason(device),
        ),
        (
            "ours megablocks compiled",
            lambda: compiled(build_ours(shape, "megablocks", state, device)),
            megablocks_skip_reason(device),
        ),
    ]
    hf_version = None
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        hf_version = transformers.__version__
        out(f"transformers {hf_version}")
        candidates.append(("transformers", lambda: build_hf(shape, state, device), ""))
    else:
        candidates.append(("transformers", None, "transformers not installed"))
    # `peers` names them without "ours ": a run can leave out the ones another run already timed.
    chosen = [c for c in candidates if c[0].removeprefix("ours ").replace(" ", "_") in peers]

    results: list[Result] = []
    for name, build, skip in chosen:
        if skip or build is None:
            out(f"  {name}: skipped ({skip})")
            results.append(Result(name, math.nan, math.nan, math.nan, f"skipped: {skip}"))
            continue
        try:
            model = build()
            seconds, loss, peak_gib = time_training(model, input_ids, steps, warmup)
            note = ""
        except Exception as error:  # report and go on: one broken peer must not hide the others
            seconds, loss, peak_gib, note = (
                math.nan,
                math.nan,
                math.nan,
                f"failed: {type(error).__name__}: {error}",
            )
        finally:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(Result(name, seconds, loss, peak_gib, note))
        out(f"  {name}: {seconds:.3f} s/step, first loss {loss:.4f}, peak {peak_gib:.1f} GiB {note}")

    hf_s = next((r.seconds for r in results if r.name == "transformers"), math.nan)
    out(
        f"  {'peer':24s} {'s/step':>8s} {'tokens/s':>10s} {'MFU meas.':>9s} {'MFU nom.':>8s} "
        f"{'peak GiB':>8s} {'vs HF':>6s} {'loss@1':>7s}"
    )
    table = []
    for r in results:
        tps = shape.tokens / r.seconds
        mfu = fpt * tps / peak
        mfu_nom = fpt * tps / nominal if nominal else math.nan
        speedup = hf_s / r.seconds
        row = {
            "peer": r.name,
            "s_per_step": r.seconds,
            "tokens_per_s": tps,
            "mfu_measured": mfu,
            "mfu_nominal": mfu_nom,
            "peak_gib": r.peak_gib,
            "vs_hf": speedup,
            "first_loss": r.first_loss,
            "note": r.note,
        }
        table.append(row)
        out(
            f"  {r.name:24s} {r.seconds:8.3f} {tps:10.0f} {mfu:9.1%} {mfu_nom:8.1%} {r.peak_gib:8.1f} "
            f"{speedup:6.2f} {r.first_loss:7.4f} {r.note}"
        )
    return {
        "transformers": hf_version,
        "device": card,
        "shape": shape._asdict(),
        "peak_measured": peak,
        "peak_nominal": nominal,
        "flops_per_token": fpt,
        "rows": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy size on any device: checks code paths only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per peer (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {GPU_1B.batch})")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)} (default: all)"
    )
    args = parser.parse_args()
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"--peers: unknown {unknown}; choose from {list(PEERS)}")
    results = run(quick=args.quick, steps=args.steps, batch=args.batch, peers=peers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
