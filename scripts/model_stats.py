"""Size a DBRX config before training it: parameters, FLOPs, KV cache, memory per GPU.

    python scripts/model_stats.py yamls/pretrain/dbrx-132b.yaml [--world-size 512] [--json] [key=value ...]
    python scripts/model_stats.py yamls/finetune/dbrx-instruct-lora.yaml model.pretrained=<folder> --fit-gb 80

The model is built on `meta` (nothing allocated) and its parameters counted; the analytic counts
of dbrx_train.model.stats must agree. `trainable_params` are all of them for full fine-tuning, the
adapters for LoRA (model.peft_config), counted on the meta model with its adapters. FLOPs per token
are training (forward + backward) FLOPs of the active parameters at the YAML's max_seq_len. Memory
per GPU follows `dbrx_train.model.stats.estimate_training_memory` (formula in docs/hf.md) for the
YAML's kind of fine-tuning (LoRA holds its frozen base in bf16 under amp_bf16); the sharding degree
is `fsdp_config.data_parallel_shard_degree` for HYBRID_SHARD, else the world size (--world-size,
default 8 = one node). --fit-gb G also finds the fewest nodes (--gpus-per-node, 8) whose GPUs of G GB
each hold the estimate with 10% to spare (fragmentation, communication buffers, CUDA context).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dbrx_train.config.run import TrainConfig, load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.lora import apply_lora, count_adapter_params
from dbrx_train.model.stats import (
    MemoryEstimate,
    count_params,
    estimate_training_memory,
    flops_per_token,
    kv_cache_bytes_per_token,
)

GIB = 1024**3


def stats(
    yaml_path: str,
    overrides: list[str],
    world_size: int | None,
    fit_gb: float | None = None,
    gpus_per_node: int = 8,
) -> dict:
    cfg = load_config(yaml_path, overrides)
    config = cfg.model.dbrx
    peft = cfg.model.peft_config
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
        if peft is not None:
            apply_lora(model, peft.spec)
    counts = count_params(config)
    trainable = count_adapter_params(config, peft.spec) if peft is not None else counts.total
    built = sum(p.numel() for p in model.parameters())
    built_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if (built, built_trainable) != (counts.total + (trainable if peft else 0), trainable):
        raise AssertionError(
            f"meta model has {built} parameters ({built_trainable} trainable), the analytic count {counts.total} "
            f"({trainable} trainable)"
        )
    world_size = world_size or 8
    memory, shard_degree, micro = memory_per_gpu(cfg, world_size, trainable)
    result = {
        "config": yaml_path,
        "fine_tuning": "lora" if peft is not None else "full",
        "total_params": counts.total,
        "active_params": counts.active,
        "trainable_params": trainable,
        "trainable_fraction": trainable / counts.total,
        "flops_per_token": flops_per_token(config, cfg.max_seq_len, frozen_weights=peft is not None),
        "seq_len": cfg.max_seq_len,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, 2),
        "world_size": world_size,
        "shard_degree": shard_degree,
        "micro_batch_size": micro,
        "memory_per_gpu_bytes": {**memory._asdict(), "total": memory.total},
    }
    if fit_gb is not None:
        result["fit"] = fewest_nodes(cfg, trainable, fit_gb, gpus_per_node)
    return result


def memory_per_gpu(cfg: TrainConfig, world_size: int, trainable: int) -> tuple[MemoryEstimate, int, int]:
    """(estimate, shard degree, micro-batch) for `cfg` on `world_size` GPUs."""
    fsdp = cfg.fsdp
    shard_degree = world_size
    if fsdp is not None and fsdp.sharding_strategy == "HYBRID_SHARD" and fsdp.data_parallel_shard_degree:
        shard_degree = fsdp.data_parallel_shard_degree
    if fsdp is None:
        shard_degree = 1  # no FSDP: every rank holds everything
    micro = cfg.device_train_microbatch_size
    if not isinstance(micro, int):  # null or auto: the whole device batch
        micro = max(1, cfg.global_train_batch_size // world_size)
    # `auto` and amp_* compute in 16 bits on GPUs, which is what this sizes.
    compute_bytes = 4 if cfg.precision == "fp32" else 2
    frozen_bytes = 4
    if (
        cfg.model.peft_config is not None
        and fsdp is not None
        and compute_bytes == 2
        and fsdp.mixed_precision != "FULL"
    ):
        frozen_bytes = 2  # train.py holds the frozen base in the dtype FSDP computes in (hold_frozen_base)
    memory = estimate_training_memory(
        cfg.model.dbrx,
        world_size=shard_degree,
        micro_batch_size=micro,
        seq_len=cfg.max_seq_len,
        optimizer_states=1 if cfg.optimizer.name == "decoupled_lionw" else 2,
        compute_bytes=compute_bytes,
        activation_checkpointing=bool(fsdp and fsdp.activation_checkpointing),
        trainable_params=trainable,
        frozen_bytes=frozen_bytes,
        fsdp=fsdp is not None,
        expert_adapters=bool(cfg.model.peft_config and cfg.model.peft_config.expert_targets),
    )
    return memory, shard_degree, micro


def fewest_nodes(
    cfg: TrainConfig, trainable: int, gpu_gb: float, gpus_per_node: int, max_nodes: int = 512
) -> dict:
    """The fewest nodes whose GPUs hold the estimate with 10% to spare (null if none up to max_nodes).
    The global batch must divide over them too: the result says whether the YAML's does."""
    limit = 0.9 * gpu_gb * 1e9
    for nodes in range(1, max_nodes + 1):
        world = nodes * gpus_per_node
        memory, _, _ = memory_per_gpu(cfg, world, trainable)
        if memory.total <= limit:
            return {
                "gpu_gb": gpu_gb,
                "gpus_per_node": gpus_per_node,
                "nodes": nodes,
                "gpus": world,
                "memory_per_gpu_bytes": memory.total,
                "batch_divides": cfg.global_train_batch_size % world == 0,
            }
    return {
        "gpu_gb": gpu_gb,
        "gpus_per_node": gpus_per_node,
        "nodes": None,
        "gpus": None,
        "memory_per_gpu_bytes": None,
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
    parser.add_argument("--fit-gb", type=float, help="also find the fewest nodes of GPUs with this many GB")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        result = stats(args.yaml, args.overrides, args.world_size, args.fit_gb, args.gpus_per_node)
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
        f"  trainable parameters  {result['trainable_params'] / 1e9:10.3f} B  ({result['trainable_params']:,}; "
        f"{result['trainable_fraction']:.2%}, {result['fine_tuning']} fine-tuning)"
    )
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
    fit = result.get("fit")
    if fit is not None:
        where = f"{fit['gpu_gb']:g} GB GPUs, {fit['gpus_per_node']} per node"
        if fit["nodes"] is None:
            print(f"  fits on               no node count up to 512 ({where})")
        else:
            batch = "" if fit["batch_divides"] else "; global_train_batch_size must become a multiple of it"
            print(
                f"  fits on               {fit['nodes']} node(s) = {fit['gpus']} GPUs ({where}): "
                f"{fit['memory_per_gpu_bytes'] / GIB:.1f} GiB each, 10% spare{batch}"
            )


if __name__ == "__main__":
    main()
