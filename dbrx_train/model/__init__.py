"""DBRX model: config, plain-PyTorch model with HF DBRX parameter names, analytic statistics."""

from dbrx_train.model.config import DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig
from dbrx_train.model.dbrx import CausalLMOutput, DbrxForCausalLM
from dbrx_train.model.stats import ParamCounts, count_params, flops_per_token, kv_cache_bytes_per_token

__all__ = [
    "CausalLMOutput",
    "DbrxAttentionConfig",
    "DbrxConfig",
    "DbrxFFNConfig",
    "DbrxForCausalLM",
    "ParamCounts",
    "count_params",
    "flops_per_token",
    "kv_cache_bytes_per_token",
]
