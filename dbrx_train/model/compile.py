"""torch.compile for regions of a plain DbrxForCausalLM, chosen by name.

Regions, not the whole model: each MoE layer syncs with the host once (its experts' row counts) and
runs a hand-written autograd.Function over a Python loop of matmuls. A whole-model compile would
break its graph there and recompile for every new list of row counts. The regions below have fixed
shapes for a fixed batch, so each compiles once (all blocks share one compiled code object):
    loss       the cross-entropy over lm_head's logits (log-softmax, gather, mean; fp32 upcast)
    attention  each block's norm -> attention (fused Wqkv, clip_qkv, RoPE, sdpa) -> residual -> norm
    router     each block's router (linear, fp32 softmax, top-k, renormalisation)
Measured on CPU (docs/performance.md): the loss region makes a training step with DBRX's 100k
vocabulary 1.2-1.6x faster with identical gradients; attention and router are within the noise there.

Compile before FSDP and activation checkpointing wrap the blocks: the compiled regions then sit
inside each checkpointed, sharded block (recomputed in backward like the rest of it). Compiled regions
keep their parameters and names, so checkpoints are unaffected.
"""

from __future__ import annotations

import torch

from dbrx_train.model.dbrx import DbrxForCausalLM, causal_lm_loss

COMPILE_REGIONS = ("loss", "attention", "router")


def compile_regions(
    model: DbrxForCausalLM,
    regions: list[str] | tuple[str, ...],
    mode: str = "default",
    dynamic: bool | None = None,
) -> None:
    """Compile `regions` of `model` in place; an unknown region name is a ValueError."""
    unknown = sorted(set(regions) - set(COMPILE_REGIONS))
    if unknown:
        raise ValueError(f"unknown compile region(s) {unknown}; choose from {list(COMPILE_REGIONS)}")
    options = {"mode": mode, "dynamic": dynamic}
    if "loss" in regions:
        model.loss_fn = torch.compile(causal_lm_loss, **options)
    for block in model.transformer.blocks:
        if "attention" in regions:
            block.norm_attn_norm.compile(**options)
        if "router" in regions:
            block.ffn.router.compile(**options)
