"""`make bench`: CPU benchmarks against peers measured in the same run, and the 132B cluster estimate.

    python scripts/bench/run.py            # the full CPU run (~4 minutes on 2 cores, compiles included) + cluster table
    python scripts/bench/run.py --quick    # toy sizes, 2 repetitions: checks the code paths only
    python scripts/bench/run.py --json out.json   # also write every figure as JSON
    python scripts/bench/run.py --threads 1 --clock cpu   # on a loaded machine: CPU time, 1 thread
    python scripts/bench/run.py --only signal   # only the step costs of document masking and router balancing

Every ratio compares peers timed interleaved in this process (bench_timing); medians with the
min-max range of the repetitions. Goals (issues 7 and 21) are printed next to the figures they judge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster  # noqa: E402
import bench_cpu  # noqa: E402
import bench_planner  # noqa: E402
import bench_timing  # noqa: E402
from bench_timing import Timing, machine_line, paired_ratio, peak_matmul_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
YAML_132B = ROOT / "yamls/pretrain/dbrx-132b.yaml"


def fmt(t: Timing) -> str:
    return f"{t.median * 1e3:8.1f} ms [{t.low * 1e3:.0f}-{t.high * 1e3:.0f}]"


def per_token(t: dict[str, Timing], tokens: int) -> str:
    """Ours and transformers' time per token of one setting, and the speed-up."""
    us = {name: t[name].median / tokens * 1e6 for name in ("ours", "hf")}
    speedup = t["hf"].median / t["ours"].median
    return f"ours {us['ours']:7.1f} us/token  hf {us['hf']:7.1f} us/token  ours/hf speed-up {speedup:.2f}x"


def versus(times: dict[str, Timing], peer: str, what: str, out) -> None:
    """One line per variant: its time and its ratio to `peer`'s, measured in the same run."""
    width = max(map(len, times))
    for name, t in times.items():
        out(f"  {name:{width}s} {fmt(t)}  {t.median / times[peer].median:.2f}x {what}")


def run(quick: bool = False, threads: int = 2, out=print) -> dict:
    torch.set_num_threads(threads)
    shape = bench_cpu.TOY if quick else bench_cpu.MID
    reps = 2 if quick else 5
    results: dict = {"machine": machine_line(threads), "shape": shape._asdict()}
    out(f"machine: {results['machine']}")
    matmul_n = 256 if quick else 2048
    peak = peak_matmul_flops(n=matmul_n, min_seconds=0.05 if quick else 1.0)
    out(
        f"peak now: fp32 {matmul_n}^2 matmul {peak / 1e9:.1f} GFLOP/s (MFU uses a matmul peer timed with each step)"
    )
    out(f"config: {shape}")

    # 1. Training step vs transformers
    out("\n== training step (fwd + bwd + fused AdamW), ours vs transformers.DbrxForCausalLM, same weights ==")
    train_rows = []
    settings = [(f"vocab {shape.vocab_size} (MoE-focused)", shape, reps, True)]
    if not quick:
        real = shape._replace(vocab_size=bench_cpu.VOCAB_REAL)
        settings.append((f"vocab {bench_cpu.VOCAB_REAL} (DBRX's; lm_head dominates)", real, 3, False))
    for label, s, r, with_unfused in settings:
        t = bench_cpu.bench_train_step(s, reps=r, matmul_n=matmul_n, with_unfused=with_unfused)
        ours_tps, hf_tps = s.tokens / t.ours.median, s.tokens / t.hf.median
        mfu_ours, mfu_hf = (t.flops_per_step / t.peak_flops / x.median for x in (t.ours, t.hf))
        out(f"{label}; matmul peer {t.peak_flops / 1e9:.1f} GFLOP/s")
        out(f"  ours {fmt(t.ours)}  {ours_tps:8.0f} tok/s  MFU {mfu_ours:6.1%}")
        out(f"  hf   {fmt(t.hf)}  {hf_tps:8.0f} tok/s  MFU {mfu_hf:6.1%}")
        if t.unfused is not None:
            out(
                f"  ours with the unfused MoE steps (before) {fmt(t.unfused)}: fused is {t.unfused.median / t.ours.median:.2f}x"
            )
        out(
            f"  ours with compile_config (the loss compiled) {fmt(t.compiled)}: "
            f"{t.hf.median / t.compiled.median:.2f}x transformers, {t.ours.median / t.compiled.median:.2f}x eager"
        )
        out(f"  speed-up ours/hf {t.hf.median / t.ours.median:.2f}x eager (goal >= 1.25x); MFU goal >= 70%")
        train_rows.append(
            {
                "label": label,
                "ours_s": t.ours.median,
                "hf_s": t.hf.median,
                "spread_ours": t.ours.spread,
                "spread_hf": t.hf.spread,
                "tokens_per_s_ours": ours_tps,
                "tokens_per_s_hf": hf_tps,
                "speedup": t.hf.median / t.ours.median,
                "mfu_ours": mfu_ours,
                "mfu_hf": mfu_hf,
                "peak_flops": t.peak_flops,
                "unfused_s": t.unfused.median if t.unfused is not None else None,
                "compiled_s": t.compiled.median,
                "speedup_compiled": t.hf.median / t.compiled.median,
            }
        )
    results["train_step"] = train_rows

    # 2. The MoE layer alone
    out(f"\n== MoE layer fwd+bwd ({shape.tokens} tokens, E={shape.num_experts}, top-{shape.top_k}) ==")
    layer, diff = bench_cpu.bench_moe_layer(shape, reps=2 if quick else 7)
    out(f"outputs agree: max |ours - peer| = {diff:.1e}")
    for name, t in layer.items():
        rel = layer["ours"].median / t.median
        out(f"  {name:13s} {fmt(t)}  {shape.tokens / t.median:8.0f} tok/s  ours is {rel:.2f}x its time")
    moe_vs_dense = layer["dense GLU"].median / layer["ours"].median
    out(f"  ours vs dense GLU (hidden top_k*F): {moe_vs_dense:.2f}x its throughput (goal >= 0.8x)")
    results["moe_layer"] = {name: t.median for name, t in layer.items()}
    results["moe_layer_vs_dense"] = moe_vs_dense
    results["moe_layer_max_diff"] = diff

    # 3. Peak memory
    out("\n== peak memory of a training step (fwd + bwd + fused AdamW) ==")
    results["memory"] = {}
    for batch in (shape.batch,) if quick else (shape.batch, 4 * shape.batch):
        mem = bench_cpu.bench_memory(shape._replace(batch=batch), threads)
        out(f"batch {batch} x {shape.seq_len}")
        results["memory"][batch] = report_memory(mem, out, goal=" (goal <= 0.8x)")
    out(f"  method: {bench_cpu.MEMORY_METHOD}")

    # 4. Scaling
    seq_lens = [32] if quick else [128, 256, 512, 1024]
    out(f"\n== scaling: train fwd+bwd, {shape.tokens} tokens per batch, sequence length grows ==")
    seq = bench_cpu.bench_seq_scaling(shape, seq_lens, reps=2 if quick else 3)
    for T, t in seq.items():
        out(f"  T={T:5d}  {per_token(t, shape.tokens)}")
    expert_counts = [4] if quick else [4, 8, 16, 32, 64]
    out(f"== scaling: MoE layer fwd+bwd, top-{shape.top_k} and F fixed (same active FLOPs), experts grow ==")
    exp = bench_cpu.bench_expert_scaling(shape, expert_counts, reps=2 if quick else 5)
    for E, t in exp.items():
        out(f"  E={E:3d}  {per_token(t, shape.tokens)}")
    results["seq_scaling"] = {T: {k: v.median for k, v in t.items()} for T, t in seq.items()}
    results["expert_scaling"] = {E: {k: v.median for k, v in t.items()} for E, t in exp.items()}

    # 5. The training signal: document masking and step-wide router balancing
    results.update(signal_report(shape, quick, out))

    # 6. The step, the MoE layer and memory in bf16: amp_bf16 (CPU autocast, fp32 weights and AdamW)
    results["bf16"] = bf16_report(shape, quick, reps, matmul_n, train_rows[0]["ours_s"], out)

    # 7. The memory planner (scripts/model_stats.py) against a measured peak, full and LoRA
    results["planner"] = bench_planner.run(quick=quick, out=out)

    # 8. The 132B config on a GPU cluster, on paper
    results["cluster"] = cluster_report(out)
    return results


def signal_report(shape, quick: bool, out=print) -> dict:
    """Issue 19's step costs: document masking against the plain causal step, each router-balancing
    option against the default; the same tokens, peers interleaved, ratios per round (median [min-max])."""
    results: dict = {}
    doc_lens = [shape.seq_len // 4] if quick else [shape.seq_len // 2, shape.seq_len // 8, 16]
    out(
        f"\n== document masking: train fwd+bwd, {shape.tokens} tokens, rows of packed documents vs plain causal =="
    )
    masking = bench_cpu.bench_document_masking(shape, doc_lens, reps=2 if quick else 5)
    for name, t in masking.items():
        cost = paired_ratio(t, masking["plain causal"])
        out(f"  {name:18s} {fmt(t)}  {cost.median:.2f}x the plain step [{cost.low:.2f}-{cost.high:.2f}]")
    results["document_masking"] = {name: t.median for name, t in masking.items()}
    microbatches = 2 if quick else 4
    out(
        f"== router balancing: fwd+bwd over {microbatches} microbatches, each option vs the default "
        "(moe_loss_scope microbatch) =="
    )
    balancing = bench_cpu.bench_balancing(shape, microbatches, reps=2 if quick else 5)
    for name, t in balancing.items():
        cost = paired_ratio(t, balancing["microbatch"])
        out(f"  {name:10s} {fmt(t)}  {cost.median:.2f}x microbatch [{cost.low:.2f}-{cost.high:.2f}]")
    results["balancing"] = {name: t.median for name, t in balancing.items()}
    return results


def bf16_report(shape, quick: bool, reps: int, matmul_n: int, ours_fp32_s: float, out=print) -> dict:
    """Issue 21's rows: the step, the MoE layer and memory under bf16 autocast, against the same peers."""
    bf16 = torch.bfloat16
    results: dict = {"train_step": []}
    out(
        "\n== training step in bf16 (precision amp_bf16: CPU autocast, fp32 weights and AdamW), "
        "ours vs transformers, same weights and batch =="
    )
    for init in ("ours",) if quick else ("ours", "transformers"):
        t = bench_cpu.bench_train_step_bf16(shape, reps=reps, init=init, matmul_n=matmul_n)
        speedup = paired_ratio(t.hf, t.ours)
        mfu_ours, mfu_hf = (t.flops_per_step / t.peak_flops / x.median for x in (t.ours, t.hf))
        # Per round: this round's step against the fastest matmul repetition (the peak estimate).
        mfu_rounds = [t.flops_per_step / t.peak_flops / x for x in t.ours.samples]
        out(
            f"weights from {init}'s init (busiest expert {t.expert_imbalance:.2f}x the mean rows; first loss "
            f"ours {t.losses[0]:.4f}, transformers {t.losses[1]:.4f}); bf16 matmul peer {t.peak_flops / 1e9:.1f} GFLOP/s"
        )
        out(f"  ours {fmt(t.ours)}  {shape.tokens / t.ours.median:8.0f} tok/s  MFU {mfu_ours:6.1%}")
        out(f"  hf   {fmt(t.hf)}  {shape.tokens / t.hf.median:8.0f} tok/s  MFU {mfu_hf:6.1%}")
        out(
            f"  speed-up ours/hf {speedup.median:.2f}x [{speedup.low:.2f}-{speedup.high:.2f} over rounds] "
            f"(goal >= 1.5x); MFU {mfu_ours:.1%} [{min(mfu_rounds):.1%}-{max(mfu_rounds):.1%}] of the bf16 "
            f"matmul peak (goal >= 60%)"
        )
        results["train_step"].append(
            {
                "init": init,
                "ours_s": t.ours.median,
                "hf_s": t.hf.median,
                "speedup": speedup.median,
                "speedup_low": speedup.low,
                "speedup_high": speedup.high,
                "mfu_ours": mfu_ours,
                "mfu_hf": mfu_hf,
                "peak_flops": t.peak_flops,
                "expert_imbalance": t.expert_imbalance,
            }
        )
    first = results["train_step"][0]
    out(
        f"  ours bf16 vs ours fp32 (the fp32 table above, another loop): {ours_fp32_s / first['ours_s']:.2f}x faster"
    )

    out(
        f"\n== MoE layer fwd+bwd in bf16 autocast ({shape.tokens} tokens, E={shape.num_experts}, top-{shape.top_k}) =="
    )
    layer, diff = bench_cpu.bench_moe_layer(shape, reps=2 if quick else 7, dtype=bf16)
    out(f"outputs agree: max |ours - transformers| = {diff:.1e} (bf16 rounding)")
    for name, t in layer.items():
        out(f"  {name:13s} {fmt(t)}  {shape.tokens / t.median:8.0f} tok/s")
    vs_dense = paired_ratio(layer["dense GLU"], layer["ours"])
    vs_hf = paired_ratio(layer["hf"], layer["ours"])
    out(
        f"  ours vs dense GLU (hidden top_k*F): {vs_dense.median:.2f}x its throughput "
        f"[{vs_dense.low:.2f}-{vs_dense.high:.2f}]; vs transformers' FFN {vs_hf.median:.2f}x [{vs_hf.low:.2f}-{vs_hf.high:.2f}]"
    )
    results["moe_layer"] = {name: t.median for name, t in layer.items()}
    results["moe_layer_vs_dense"] = vs_dense.median
    results["moe_layer_vs_hf"] = vs_hf.median
    results["moe_layer_max_diff"] = diff

    out("\n== peak memory of a bf16 training step (autocast; fp32 weights, gradients and AdamW state) ==")
    mem = bench_cpu.bench_memory(shape, torch.get_num_threads(), dtype=bf16)
    out(f"batch {shape.batch} x {shape.seq_len}")
    results["memory"] = report_memory(mem, out)
    return results


def report_memory(mem: dict[str, dict[str, float]], out, goal: str = "") -> dict:
    """Print one `bench_memory` result (ours and hf, in MiB) and ours/hf per measure; returns both."""
    for name, m in mem.items():
        out(
            f"  {name:4s} rest {m['rest_mib']:6.0f} MiB  peak {m['total_mib']:6.0f}  "
            f"step {m['step_mib']:6.0f}  saved by forward {m['saved_mib']:6.0f}"
        )
    ratios = {k: mem["ours"][f"{k}_mib"] / mem["hf"][f"{k}_mib"] for k in ("total", "step", "saved")}
    out(
        f"  ours/hf: peak {ratios['total']:.2f}x, step {ratios['step']:.2f}x, saved {ratios['saved']:.2f}x{goal}"
    )
    return {**mem, **{f"{k}_ratio": v for k, v in ratios.items()}}


def cluster_report(out=print) -> list[list[str]]:
    from dbrx_train.config.run import load_config

    cfg = load_config(str(YAML_132B), [])
    a = bench_cluster.Assumptions(
        global_batch=cfg.global_train_batch_size,
        micro_batch=cfg.device_train_microbatch_size,
        seq_len=cfg.max_seq_len,
        shard_degree=cfg.fsdp.data_parallel_shard_degree or 8,
    )
    out(f"\n== on paper: {YAML_132B.relative_to(ROOT)} on N H100s (FSDP/HSDP, bf16) ==")
    for line in a.lines():
        out(f"  assumption: {line}")
    rows = bench_cluster.table(cfg.model.dbrx, a)
    for row in rows:
        out("  " + row)
    return [row.split() for row in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the code paths, not speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(bench_timing.CLOCKS),
        default="wall",
        help="cpu: time by this process's CPU time, for a loaded machine (use with --threads 1)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--only",
        choices=["signal"],
        help="signal: only the step costs of document masking and the router-balancing options",
    )
    args = parser.parse_args()
    bench_timing.clock = bench_timing.CLOCKS[args.clock]
    if args.only == "signal":
        torch.set_num_threads(args.threads)
        print(f"machine: {machine_line(args.threads)}")
        shape = bench_cpu.TOY if args.quick else bench_cpu.MID
        results = {"shape": shape._asdict(), **signal_report(shape, args.quick)}
    else:
        results = run(quick=args.quick, threads=args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
