"""Analytic model statistics from a config alone: parameter counts, training FLOPs, KV-cache size.

Nothing is allocated, so the 132B config can be sized on a laptop; tests cross-check the counts
against `sum(p.numel())` of a model built on the meta device.
"""

from __future__ import annotations

from typing import NamedTuple

from dbrx_train.model.config import DbrxConfig


class ParamCounts(NamedTuple):
    total: int  # every parameter (a tied lm_head counted once)
    active: int  # parameters one token touches: all non-expert ones + top_k / E of the experts


def _layer_counts(config: DbrxConfig) -> tuple[int, int]:
    """(non-expert, expert) parameters of one block."""
    D, F = config.d_model, config.ffn_config.ffn_hidden_size
    E = config.ffn_config.moe_num_experts
    kv_dim = config.attn_config.kv_n_heads * config.head_dim
    norms = 2 * D  # norm_1, norm_2 (no bias)
    attention = D * (D + 2 * kv_dim) + D * D  # Wqkv + out_proj
    router = D * E
    experts = 3 * E * F * D  # w1, v1, w2
    return norms + attention + router, experts


def count_params(config: DbrxConfig) -> ParamCounts:
    D, V, L = config.d_model, config.vocab_size, config.n_layers
    dense, experts = _layer_counts(config)
    embeddings = V * D * (1 if config.tie_word_embeddings else 2)  # wte (+ lm_head)
    total = embeddings + L * (dense + experts) + D  # + norm_f
    ffn = config.ffn_config
    inactive = L * experts * (ffn.moe_num_experts - ffn.moe_top_k) // ffn.moe_num_experts
    return ParamCounts(total=total, active=total - inactive)


def flops_per_token(config: DbrxConfig, seq_len: int, frozen_weights: bool = False) -> int:
    """Training (forward + backward) FLOPs per token, PaLM appendix B / LLM Foundry convention.

    6 * N_active + 12 * n_layers * d_model * seq_len, where
    - N_active excludes the input embedding (a lookup, not a matmul) but includes lm_head
      (its own weight even when tied to wte) and the router;
    - the attention term (QK^T and AV: 2 matmuls x 2 FLOPs x 3 for fwd+bwd) is NOT halved for
      causal masking, as in PaLM and LLM Foundry, so MFU numbers compare with theirs; causal kernels
      skip about half of it, so this overstates executed FLOPs at long seq_len.
    `frozen_weights` (LoRA: the base is frozen): backward computes no weight gradients, so 4 instead
    of 6 FLOPs per weight; the adapters' own FLOPs (a fraction of a percent) are left out.
    """
    D, V, L = config.d_model, config.vocab_size, config.n_layers
    counts = count_params(config)
    input_embedding = 0 if config.tie_word_embeddings else V * D
    matmul_params = counts.active - input_embedding
    return (4 if frozen_weights else 6) * matmul_params + 12 * L * D * seq_len


def kv_cache_bytes_per_token(config: DbrxConfig, dtype_bytes: int = 2) -> int:
    """Bytes of K and V cached per generated/prefilled token, over all layers."""
    return 2 * config.n_layers * config.attn_config.kv_n_heads * config.head_dim * dtype_bytes


class MemoryEstimate(NamedTuple):
    """Bytes per GPU for FSDP training; see `estimate_training_memory`."""

    params: int
    grads: int
    optimizer: int
    gathered_block: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered_block + self.activations


def estimate_training_memory(
    config: DbrxConfig,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    optimizer_states: int = 2,
    compute_bytes: int = 2,
    activation_checkpointing: bool = False,
    trainable_params: int | None = None,
    frozen_bytes: int = 4,
    fsdp: bool = True,
    expert_adapters: bool = False,
) -> MemoryEstimate:
    """A per-GPU budget for FULL_SHARD FSDP: fp32 sharded trainable weights, their fp32 gradients and
    optimizer states (Composer's DEFAULT mixed precision), `compute_bytes` per element for gathered
    weights and activations.

    Full fine-tuning trains every parameter; LoRA (`trainable_params` = the adapters) trains few and
    holds the frozen rest in `frozen_bytes` per parameter (2: bf16, as train.py keeps it under amp_bf16).
    params = (frozen * frozen_bytes + trainable * 4) / world_size
    grads + optimizer = trainable * 4 * (1 + optimizer_states) / world_size (AdamW: 2 states, Lion: 1).
    gathered_block = 2 blocks' parameters in compute precision (the one running + the prefetched);
        0 without FSDP (`fsdp=False`), where nothing is gathered.
    activations, per micro-batch of N = micro_batch_size * seq_len tokens:
        per layer ~ N * (D * 16 + top_k * F * 3 + H * seq_len) elements without checkpointing
        (block inputs, norms, q/k/v/attention output, the expert hidden states, attention
        probabilities for non-fused kernels ~ H * T), or N * D with activation checkpointing plus
        one layer's full set. Expert adapters run the experts under autograd, which keeps the gathered
        rows and two more hidden states: + N * top_k * (D + 2 F) per layer.
        Plus the loss over the vocabulary at its peak (the start of backward): the logits in compute
        precision (kept as the step's output) and, in fp32, their log-probabilities, the gradient of
        those and the logits' gradient, plus an fp32 copy of the logits when computing in 16 bits:
        N * V * (compute_bytes + 4 * (3 + [compute_bytes != 4])).
    An estimate to size a job before launching it, not an allocator trace: fragmentation,
    communication buffers and the CUDA context (a few GB) come on top. Checked against a measured
    CPU peak for the tiny model, full and LoRA (make bench: "planner vs measured").
    """
    D, F, V, L = config.d_model, config.ffn_config.ffn_hidden_size, config.vocab_size, config.n_layers
    k, H = config.ffn_config.moe_top_k, config.n_heads
    total = count_params(config).total
    trainable = total if trainable_params is None else trainable_params

    def shard(n_bytes: int) -> int:
        return -(-n_bytes // world_size)

    dense, experts = _layer_counts(config)
    N = micro_batch_size * seq_len
    per_token = 16 * D + 3 * k * F + H * seq_len + (k * (D + 2 * F) if expert_adapters else 0)
    per_layer = N * per_token * compute_bytes
    if activation_checkpointing:
        activations = L * N * D * compute_bytes + per_layer
    else:
        activations = L * per_layer
    activations += N * V * (compute_bytes + 4 * (3 + (compute_bytes != 4)))
    return MemoryEstimate(
        params=shard((total - trainable) * frozen_bytes + trainable * 4),
        grads=shard(trainable * 4),
        optimizer=shard(trainable * 4 * optimizer_states),
        gathered_block=2 * (dense + experts) * compute_bytes if fsdp else 0,
        activations=activations,
    )
