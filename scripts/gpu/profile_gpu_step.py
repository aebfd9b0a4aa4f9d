"""torch.profiler tables of one bench_gpu.py training step (fwd + bwd + fused AdamW, bf16 autocast):
where the step's time goes on the GPU, and how often the host waits for it.

    python scripts/gpu/profile_gpu_step.py [--backend megablocks|torch] [--batch 2] [--steps 2] [--top 30]

Prints two tables: ops by self CUDA time (the kernels), and by self CPU time (launch overhead and
host syncs: cudaStreamSynchronize, cudaMemcpy*). `--quick` runs the toy size on any device (CPU
included) to check the code path; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_gpu import GPU_1B, QUICK, build_ours, reference_state, training_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["megablocks", "torch"], default="megablocks")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {GPU_1B.batch})")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="toy size on any device: checks the code path")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK if args.quick else GPU_1B
    if args.batch is not None:
        shape = shape._replace(batch=args.batch)
    model = build_ours(shape, args.backend, reference_state(shape, device), device)
    input_ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), device=device)
    step = training_step(model, input_ids)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(
        f"{args.backend} backend, batch {shape.batch} x {shape.seq_len}, {args.steps} steps profiled, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}"
    )
    averages = prof.key_averages()
    if device.type == "cuda":
        print("\nby self CUDA time (the kernels):")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
    print("\nby self CPU time (launches, host syncs):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
