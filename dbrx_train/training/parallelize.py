"""FSDP2 for a plain DbrxForCausalLM, in one place.

Composer applies it (``Trainer(parallelism_config=...)``) in a fixed order: activation
checkpointing of each block -> ``fully_shard`` of each ``DbrxBlock`` -> the root. This module only
says *what* to wrap and builds the FSDP2 config and device mesh; the model file stays free of
``torch.distributed``.
"""

from __future__ import annotations

import warnings

from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, ParallelismConfig
from torch.distributed.device_mesh import init_device_mesh

from dbrx_train.config import FSDPConfig
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.dbrx import DbrxBlock
from dbrx_train.schema import ConfigError


def mark_fsdp_units(model: DbrxForCausalLM) -> None:
    """One FSDP unit and one activation-checkpointing unit per transformer block.

    Composer looks these functions up on the ComposerModel's child (our model); embeddings,
    final norm and lm_head stay in the root unit.
    """

    def is_block(module) -> bool:
        return isinstance(module, DbrxBlock)

    model.fsdp_wrap_fn = is_block
    model.activation_checkpointing_fn = is_block
    # For `init_device: meta`: Composer fills each still-meta module after sharding with this.
    model.param_init_fn = model.init_module


def build_parallelism_config(fsdp: FSDPConfig, device_type: str) -> ParallelismConfig:
    """FSDP2 config with the device mesh for the chosen sharding strategy. Needs dist initialised."""
    world_size = dist.get_world_size()
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
