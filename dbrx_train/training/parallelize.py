"""FSDP2 for a plain DbrxForCausalLM, in one place.

Composer applies it (``Trainer(parallelism_config=...)``) in a fixed order: activation
checkpointing of each block -> ``fully_shard`` of each ``DbrxBlock`` -> the root. This module only
says *what* to wrap and builds the FSDP2 config and device mesh; the model file stays free of
``torch.distributed``.
"""

from __future__ import annotations

import warnings

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, ParallelismConfig
from torch.distributed.device_mesh import init_device_mesh

from dbrx_train import compat
from dbrx_train.config.run import FSDPConfig, TrainConfig
from dbrx_train.config.schema import ConfigError
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.dbrx import DbrxBlock
from dbrx_train.model.lora import adapter_modules, adapter_param_init


def mark_fsdp_units(model: DbrxForCausalLM) -> None:
    """One FSDP unit and one activation-checkpointing unit per transformer block.

    Composer looks these functions up on the ComposerModel's child (our model); embeddings,
    final norm and lm_head stay in the root unit. LoRA adapters are FSDP units of their own (inside
    their block's), so the frozen base may be held in another dtype (FSDP2 needs one per unit).
    """
    adapters = {id(m) for m in adapter_modules(model)}

    def is_block(module) -> bool:
        return isinstance(module, DbrxBlock)

    def is_unit(module) -> bool:
        return is_block(module) or id(module) in adapters

    model.fsdp_wrap_fn = is_unit
    model.activation_checkpointing_fn = is_block
    # For `init_device: meta`: Composer fills each still-meta module after sharding with this.
    model.param_init_fn = adapter_param_init(model) if adapters else model.init_module


def hold_frozen_base(model: DbrxForCausalLM, fsdp: FSDPConfig | None, precision: str) -> torch.dtype | None:
    """LoRA: keep the frozen base in the dtype FSDP computes in (bf16 under amp_bf16 with DEFAULT or PURE
    mixed precision), halving its memory: it is never updated, so an fp32 master copy buys nothing.
    The adapters, their gradients and optimizer state stay fp32. Returns the dtype set (None: unchanged)."""
    from composer.core import Precision
    from composer.distributed.fsdp2 import create_mixed_precision_policy

    if fsdp is None:  # no FSDP cast: autocast would meet bf16 weights in fp32 ops
        return None
    dtype = create_mixed_precision_policy(Precision(precision), fsdp.mixed_precision).param_dtype
    if dtype is None or dtype == torch.float32:
        return None
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
    return dtype


def build_parallelism_config(fsdp: FSDPConfig, device_type: str) -> ParallelismConfig:
    """FSDP2 config with the device mesh for the chosen sharding strategy. Needs dist initialised."""
    world_size = dist.get_world_size()
    if device_type == "cpu":
        average_gradients_on_gloo()
    mesh = None
    if fsdp.sharding_strategy == "HYBRID_SHARD":
        shard = fsdp.data_parallel_shard_degree or dist.get_local_world_size()
        if shard <= 0 or world_size % shard:
            raise ConfigError(
                f"fsdp_config.data_parallel_shard_degree={shard} must divide the world size {world_size} "
                "for HYBRID_SHARD (shard within groups of that size, replicate across them)"
            )
        mesh = init_device_mesh(
            device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard")
        )
    elif fsdp.data_parallel_shard_degree not in (None, world_size):
        raise ConfigError(
            f"fsdp_config.data_parallel_shard_degree={fsdp.data_parallel_shard_degree} only applies to "
            f"HYBRID_SHARD; {fsdp.sharding_strategy} always shards over all {world_size} rank(s)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        fsdp2 = FSDP2Config(
            device_mesh=mesh,
            reshard_after_forward=fsdp.sharding_strategy != "SHARD_GRAD_OP",
            activation_checkpointing=fsdp.activation_checkpointing,
            activation_cpu_offload=fsdp.activation_cpu_offload,
            state_dict_type=fsdp.state_dict_type,
            mixed_precision=fsdp.mixed_precision,
            verbose=fsdp.verbose,
        )
    return ParallelismConfig(fsdp2=fsdp2)


def expert_parallel_degree(fsdp: FSDPConfig | None) -> int:
    """fsdp_config.expert_parallel_degree, 1 when off (no FSDP, null or 1)."""
    return (fsdp.expert_parallel_degree or 1) if fsdp is not None else 1


def check_expert_parallel(cfg: TrainConfig, world_size: int) -> None:
    """fsdp_config.expert_parallel_degree against the run, before any process group exists."""
    fsdp = cfg.fsdp
    degree = expert_parallel_degree(fsdp)
    if degree == 1:
        return
    key = "fsdp_config.expert_parallel_degree"
    experts = cfg.model.dbrx.ffn_config.moe_num_experts
    if degree < 1 or world_size % degree:
        raise ConfigError(f"{key}={degree} must divide the number of ranks ({world_size})")
    if experts % degree:
        raise ConfigError(f"{key}={degree} must divide model.ffn_config.moe_num_experts ({experts})")
    if fsdp.sharding_strategy == "HYBRID_SHARD":
        raise ConfigError(f"{key} works with FULL_SHARD or SHARD_GRAD_OP, not HYBRID_SHARD")
    if cfg.model.init_device != "cpu":
        raise ConfigError(
            f"{key} needs model.init_device: cpu (every rank builds the weights, keeps its experts)"
        )


def apply_expert_parallelism(
    model: DbrxForCausalLM, fsdp: FSDPConfig, precision: str, device_type: str
) -> int:
    """Shard each layer's experts over an expert-parallel mesh and `fully_shard` them on their own
    expert-data mesh, before the Trainer wraps the blocks (FSDP leaves nested FSDP modules alone).

    Mesh (world/ep, ep): ranks r*ep .. r*ep+ep-1 form one EP group; experts are sharded by rows over
    "ep" (a DTensor, so checkpoints keep the global shapes) and FSDP-sharded over "expert_dp".
    FSDP averages their gradients over expert_dp; `grad_scale` 1/ep completes the mean over all ranks.
    """
    from composer.core import Precision
    from composer.distributed.fsdp2 import create_mixed_precision_policy
    from torch.distributed.fsdp import fully_shard

    from dbrx_train.training.expert_parallel import apply_expert_parallel

    degree = fsdp.expert_parallel_degree
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=("expert_dp", "ep"))
    swapped = apply_expert_parallel(model, mesh["ep"], grad_scale=1.0 / degree)
    mp_policy = create_mixed_precision_policy(Precision(precision), fsdp.mixed_precision)
    for experts in swapped:
        fully_shard(
            experts,
            mesh=mesh["expert_dp"],
            reshard_after_forward=fsdp.sharding_strategy != "SHARD_GRAD_OP",
            mp_policy=mp_policy,
        )
    return len(swapped)


def average_gradients_on_gloo() -> None:
    """Make FSDP2 average gradients over ranks on gloo (CPU), as it does on NCCL.

    torch 2.7's FSDP2 reduces fp32/bf16 gradients with ReduceOp.AVG. Gloo has no AVG: its
    reduce-scatter silently sums (measured: a 2-rank gradient came out 2x the mean), and HSDP's
    all-reduce refuses it ("Cannot use ReduceOp.AVG with Gloo"). FSDP2's own fp16 path divides before
    and after a SUM instead; for gloo groups we send every dtype down that path. Without this, CPU
    multi-rank runs trained on the sum of the ranks' gradients (Adam barely notices; gradient
    clipping, AdamW's eps and elastic resumes do).
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    def divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
        if torch.distributed.get_backend(reduce_scatter_group) == "gloo":
            # What the original returns for fp16: a pre- and a post-divide around ReduceOp.SUM.
            return original(reduce_scatter_group, all_reduce_group, torch.float16, device_type)
        return original(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)

    original = compat.replace(
        "fsdp2_gloo_average", collectives, "_get_gradient_divide_factors", divide_factors
    )
