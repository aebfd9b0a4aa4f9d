"""Size a DBRX config before training it: parameters, FLOPs, KV cache, memory per GPU.

    python scripts/model_stats.py yamls/pretrain/dbrx-132b.yaml [--world-size 512] [--json] [key=value ...]

The model is built on `meta` (nothing allocated) and its parameters counted; the analytic counts
of dbrx_train.model.stats must agree. FLOPs per token are training (forward + backward) FLOPs of
the active parameters at the YAML's max_seq_len. Memory per GPU follows
`dbrx_train.model.stats.estimate_training_memory` (formula in docs/hf.md); the sharding degree is
`fsdp_config.data_parallel_shard_degree` for HYBRID_SHARD, else the world size (--world-size,
default 8 = one node).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.stats import (
    count_params,
    estimate_training_memory,
    flops_per_token,
    kv_cache_bytes_per_token,
)

GIB = 1024**3


def stats(yaml_path: str, overrides: list[str], world_size: int | None) -> dict:
    cfg = load_config(yaml_path, overrides)
    config = cfg.model.dbrx
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    built = sum(p.numel() for p in model.parameters())
    counts = count_params(config)
    if built != counts.total:
        raise AssertionError(f"meta model has {built} parameters, the analytic count {counts.total}")
    fsdp = cfg.fsdp
    if world_size is None:
        world_size = 8
    shard_degree = world_size
    if fsdp is not None and fsdp.sharding_strategy == "HYBRID_SHARD" and fsdp.data_parallel_shard_degree:
        shard_degree = fsdp.data_parallel_shard_degree
    if fsdp is None:
        shard_degree = 1  # no FSDP: every rank holds everything
    micro = cfg.device_train_microbatch_size
    if not isinstance(micro, int):  # null or auto: the whole device batch
        micro = max(1, cfg.global_train_batch_size // world_size)
    compute_bytes = 4 if cfg.precision == "fp32" else 2
    memory = estimate_training_memory(
        config,
        world_size=shard_degree,
        micro_batch_size=micro,
        seq_len=cfg.max_seq_len,
        optimizer_states=1 if cfg.optimizer.name == "decoupled_lionw" else 2,
        compute_bytes=compute_bytes,
        activation_checkpointing=bool(fsdp and fsdp.activation_checkpointing),
    )
    return {
        "config": yaml_path,
        "total_params": counts.total,
        "active_params": counts.active,
        "flops_per_token": flops_per_token(config, cfg.max_seq_len),
        "seq_len": cfg.max_seq_len,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, 2),
        "world_size": world_size,
        "shard_degree": shard_degree,
        "micro_batch_size": micro,
        "memory_per_gpu_bytes": {**memory._asdict(), "total": memory.total},
    }


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a world of 0 GPUs would divide by zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, as for train.py")
    parser.add_argument("--world-size", type=positive_int, default=None, help="number of GPUs (default 8)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    try:
        result = stats(args.yaml, args.overrides, args.world_size)
    except ConfigError as e:
        print(f"model_stats: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(result))
        return
    mem = result["memory_per_gpu_bytes"]
    print(f"{result['config']}")
    print(f"  total parameters      {result['total_params'] / 1e9:10.3f} B  ({result['total_params']:,})")
    print(f"  active parameters     {result['active_params'] / 1e9:10.3f} B  ({result['active_params']:,})")
    print(
        f"  train FLOPs / token   {result['flops_per_token'] / 1e9:10.1f} GFLOP  (fwd+bwd, seq_len {result['seq_len']})"
    )
    print(
        f"  KV cache / token      {result['kv_cache_bytes_per_token'] / 1024:10.1f} KiB  (bf16, all layers)"
    )
    print(
        f"  memory / GPU          {mem['total'] / GIB:10.1f} GiB  (world {result['world_size']}, "
        f"sharded over {result['shard_degree']}, micro-batch {result['micro_batch_size']})"
    )
    for key in ("params", "grads", "optimizer", "gathered_block", "activations"):
        print(f"    {key:<18}  {mem[key] / GIB:10.2f} GiB")


if __name__ == "__main__":
    main()
