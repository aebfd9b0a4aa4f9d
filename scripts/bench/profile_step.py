"""torch.profiler table of one training step of the bench's MoE config (`bench_cpu.MID`): ours, fwd +
bwd + fused AdamW, in bf16 autocast (precision amp_bf16) or fp32; ops sorted by self CPU time.

    python scripts/bench/profile_step.py [--dtype bf16|fp32] [--threads 1] [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = bench_cpu.MID
    model = bench_cpu.build_ours(shape)
    x = bench_cpu.batch_of(shape)
    step = bench_cpu.train_step(model, x, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    for _ in range(2):  # warm-up: AdamW state, allocator
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    table = averages.table(
        sort_by="self_cpu_time_total",
        row_limit=args.top,
        max_name_column_width=60,
        max_shapes_column_width=90,
    )
    print(f"{args.dtype}, {shape}, {args.threads} thread(s), {args.steps} steps profiled")
    print(table)


if __name__ == "__main__":
    main()
