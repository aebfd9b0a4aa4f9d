"""`make bench`: CPU benchmarks against peers measured in the same run, and the 132B cluster estimate.

    python scripts/bench/run.py            # the full CPU run (~4 minutes on 2 cores, compiles included) + cluster table
    python scripts/bench/run.py --quick    # toy sizes, 2 repetitions: checks the code paths only
    python scripts/bench/run.py --json out.json   # also write every figure as JSON

Every ratio compares peers timed interleaved in this process (bench_timing); medians with the
min-max range of the repetitions. Goals (issue 7) are printed next to the figures they judge.
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
from bench_timing import Timing, machine_line, peak_matmul_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
YAML_132B = ROOT / "yamls/pretrain/dbrx-132b.yaml"


def fmt(t: Timing) -> str:
    return f"{t.median * 1e3:8.1f} ms [{t.low * 1e3:.0f}-{t.high * 1e3:.0f}]"


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
        for name, m in mem.items():
            out(
                f"  {name:4s} rest {m['rest_mib']:6.0f} MiB  peak {m['total_mib']:6.0f}  "
                f"step {m['step_mib']:6.0f}  saved by forward {m['saved_mib']:6.0f}"
            )
        ratios = {k: mem["ours"][f"{k}_mib"] / mem["hf"][f"{k}_mib"] for k in ("total", "step", "saved")}
        out(
            f"  ours/hf: peak {ratios['total']:.2f}x, step {ratios['step']:.2f}x, "
            f"saved {ratios['saved']:.2f}x (goal <= 0.8x)"
        )
        results["memory"][batch] = {**mem, **{f"{k}_ratio": v for k, v in ratios.items()}}
    out(f"  method: {bench_cpu.MEMORY_METHOD}")

    # 4. Scaling
    seq_lens = [32] if quick else [128, 256, 512, 1024]
    out(f"\n== scaling: train fwd+bwd, {shape.tokens} tokens per batch, sequence length grows ==")
    seq = bench_cpu.bench_seq_scaling(shape, seq_lens, reps=2 if quick else 3)
    for T, t in seq.items():
        out(
            f"  T={T:5d}  ours {t['ours'].median / shape.tokens * 1e6:7.1f} us/token  "
            f"hf {t['hf'].median / shape.tokens * 1e6:7.1f} us/token  ours/hf speed-up {t['hf'].median / t['ours'].median:.2f}x"
        )
    expert_counts = [4] if quick else [4, 8, 16, 32, 64]
    out(f"== scaling: MoE layer fwd+bwd, top-{shape.top_k} and F fixed (same active FLOPs), experts grow ==")
    exp = bench_cpu.bench_expert_scaling(shape, expert_counts, reps=2 if quick else 5)
    for E, t in exp.items():
        out(
            f"  E={E:3d}  ours {t['ours'].median / shape.tokens * 1e6:7.1f} us/token  "
            f"hf {t['hf'].median / shape.tokens * 1e6:7.1f} us/token  ours/hf speed-up {t['hf'].median / t['ours'].median:.2f}x"
        )
    results["seq_scaling"] = {T: {k: v.median for k, v in t.items()} for T, t in seq.items()}
    results["expert_scaling"] = {E: {k: v.median for k, v in t.items()} for E, t in exp.items()}

    # 5. The memory planner (scripts/model_stats.py) against a measured peak, full and LoRA
    results["planner"] = bench_planner.run(quick=quick, out=out)

    # 6. The 132B config on a GPU cluster, on paper
    results["cluster"] = cluster_report(out)
    return results


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
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    results = run(quick=args.quick, threads=args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
