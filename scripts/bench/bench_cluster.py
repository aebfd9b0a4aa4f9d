"""On paper: step time and MFU of the 132B config under FSDP/HSDP on N H100s, to size a cluster.

Compute: model FLOPs per step (dbrx_train.model.stats.flops_per_token, 6 * active params + attention)
at an assumed achievable MFU of the compute alone. Communication per GPU per micro-batch, FSDP ZeRO-3
style inside a shard group of S GPUs: all-gather the bf16 parameters for forward and again for
backward (re-sharded after forward), reduce-scatter the bf16 gradients; once per step the HSDP
replicas all-reduce their gradient shards. Each collective is a ring (NCCL's bus-bandwidth model):
every GPU moves (S-1)/S of the payload at the group's bus bandwidth: NVLink inside a node; for a
group of whole nodes, min(NVLink, GPUs per node x NIC), as NCCL runs one ring per NIC (rail) and
each ring crosses every node boundary once; for the replica groups (one GPU per node), one NIC.
Step time is max(compute, communication) when FSDP's prefetch overlaps them perfectly, and
their sum when nothing overlaps; reality sits between.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from dbrx_train.model import DbrxConfig
from dbrx_train.model.stats import count_params, flops_per_token


class Assumptions(NamedTuple):
    peak_flops: float = 989e12  # H100 SXM dense bf16
    compute_mfu: float = 0.40  # achievable MFU of the compute alone (MoE, bf16, FSDP, checkpointing)
    nvlink_bytes_per_s: float = 450e9  # per GPU, one direction, inside a node
    ib_bytes_per_s: float = 400e9 / 8  # 400 Gb/s NIC per GPU between nodes
    gpus_per_node: int = 8
    shard_degree: int = 64  # yamls/pretrain/dbrx-132b.yaml: HYBRID_SHARD, data_parallel_shard_degree 64
    global_batch: int = 1024  # sequences; grows to N * 1 when N > global_batch
    micro_batch: int = 2  # device_train_microbatch_size
    seq_len: int = 4096
    param_bytes: int = 2  # bf16 gathered parameters (mixed_precision: PURE)
    grad_bytes: int = 2  # bf16 gradient reduction (PURE)

    def lines(self) -> list[str]:
        return [
            f"H100 peak {self.peak_flops / 1e12:.0f} TFLOP/s dense bf16; assumed compute-only MFU "
            f"{self.compute_mfu:.0%} (model FLOPs only: activation checkpointing's recompute is inside it)",
            f"NVLink {self.nvlink_bytes_per_s / 1e9:.0f} GB/s per GPU inside a node of {self.gpus_per_node}; "
            f"InfiniBand {self.ib_bytes_per_s * 8 / 1e9:.0f} Gb/s per GPU between nodes; ring collectives at "
            f"bus bandwidth min(NVLink, {self.gpus_per_node} x NIC) in shard groups of whole nodes, "
            "1 NIC in replica groups",
            f"HSDP: shard group {self.shard_degree} GPUs (params/grads/optimizer sharded inside it), "
            "replicas all-reduce gradient shards once per step",
            f"batch {self.global_batch} x {self.seq_len} tokens (more when N > {self.global_batch}: "
            f"1 sequence per GPU), micro-batch {self.micro_batch}; params gathered in "
            f"{8 * self.param_bytes}-bit twice per micro-batch (fwd, bwd), grads reduce-scattered in "
            f"{8 * self.grad_bytes}-bit every micro-batch (Composer syncs each one)",
        ]


class Estimate(NamedTuple):
    gpus: int
    nodes: int
    global_batch: int
    micro_batches: int
    compute_s: float
    comm_s: float
    overlapped_s: float
    serial_s: float
    mfu_overlapped: float
    mfu_serial: float
    tokens_per_s: float
    state_gib_per_gpu: float  # fp32 master params + fp32 grads + one fp32 optimizer moment (Lion)


def ring_seconds(payload_bytes: float, group: int, bus_bytes_per_s: float) -> float:
    if group <= 1:
        return 0.0
    return payload_bytes * (group - 1) / group / bus_bytes_per_s


def shard_group_bandwidth(group: int, a: Assumptions) -> float:
    if group <= a.gpus_per_node:
        return a.nvlink_bytes_per_s
    return min(a.nvlink_bytes_per_s, a.gpus_per_node * a.ib_bytes_per_s)


def estimate(config: DbrxConfig, gpus: int, a: Assumptions) -> Estimate:
    params = count_params(config).total
    per_gpu_batch = max(1, a.global_batch // gpus)
    global_batch = per_gpu_batch * gpus
    micro = min(a.micro_batch, per_gpu_batch)
    micro_batches = math.ceil(per_gpu_batch / micro)
    step_flops = flops_per_token(config, a.seq_len) * global_batch * a.seq_len
    compute_s = step_flops / (gpus * a.peak_flops * a.compute_mfu)

    shard = min(a.shard_degree, gpus)
    replicas = gpus // shard
    bus = shard_group_bandwidth(shard, a)
    gathers = 2 * ring_seconds(params * a.param_bytes, shard, bus)
    per_micro = gathers + ring_seconds(params * a.grad_bytes, shard, bus)
    # All-reduce = reduce-scatter + all-gather of this GPU's gradient shard, one GPU per node-group.
    replica_sync = 2 * ring_seconds(params / shard * a.grad_bytes, replicas, a.ib_bytes_per_s)
    comm_s = micro_batches * per_micro + replica_sync

    overlapped, serial = max(compute_s, comm_s), compute_s + comm_s
    model_flops_per_gpu_s = step_flops / gpus / a.peak_flops
    return Estimate(
        gpus=gpus,
        nodes=math.ceil(gpus / a.gpus_per_node),
        global_batch=global_batch,
        micro_batches=micro_batches,
        compute_s=compute_s,
        comm_s=comm_s,
        overlapped_s=overlapped,
        serial_s=serial,
        mfu_overlapped=model_flops_per_gpu_s / overlapped,
        mfu_serial=model_flops_per_gpu_s / serial,
        tokens_per_s=global_batch * a.seq_len / overlapped,
        state_gib_per_gpu=params * 12 / shard / 2**30,
    )


GPU_COUNTS = (64, 128, 256, 512, 1024, 3072)


def table(config: DbrxConfig, a: Assumptions, gpu_counts=GPU_COUNTS) -> list[str]:
    header = (
        f"{'GPUs':>5} {'nodes':>5} {'batch':>5} {'ubatch':>6} {'compute s':>9} {'comm s':>7} "
        f"{'step s (ovl)':>12} {'step s (ser)':>12} {'MFU ovl':>7} {'MFU ser':>7} {'Mtok/s':>7} "
        f"{'state GiB/GPU':>13}"
    )
    rows = [header]
    for n in gpu_counts:
        e = estimate(config, n, a)
        rows.append(
            f"{e.gpus:>5} {e.nodes:>5} {e.global_batch:>5} {e.micro_batches:>6} {e.compute_s:>9.2f} "
            f"{e.comm_s:>7.2f} {e.overlapped_s:>12.2f} {e.serial_s:>12.2f} {e.mfu_overlapped:>7.1%} "
            f"{e.mfu_serial:>7.1%} {e.tokens_per_s / 1e6:>7.2f} {e.state_gib_per_gpu:>13.1f}"
        )
    return rows
