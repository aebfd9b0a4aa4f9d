"""DBRX: a decoder-only transformer with grouped-query attention and a mixture-of-experts FFN.

Read top to bottom: rotary embedding -> attention -> norm/attention/norm -> block (+ MoE FFN from
`moe.py`) -> DbrxModel -> DbrxForCausalLM (loss, init). Parameter names and shapes equal
transformers' DbrxForCausalLM, so HF checkpoints load with a plain `load_state_dict`.

Shape legend (suffixes on names, e.g. x_BTD):
    B batch, T sequence, D d_model, H query heads, K kv heads, Dh head dim (D / H),
    R rotary frequencies (Dh / 2), V vocab, E experts, F ffn_hidden_size, N tokens (B*T), k top_k.

Building: `DbrxForCausalLM(config)` on a real device is initialised and ready. Under
`with torch.device("meta")` nothing is allocated; then `model.to_empty(device=...)` followed by
`model.init_weights()` fills parameters and the RoPE buffers on that device.

Packed rows: a batch may carry `sequence_id` (B, T), LLM Foundry's convention: the documents of a
row numbered 0, 1, ... and -1 on padding. With `attn_config.attn_uses_sequence_id` each document
then attends only to itself (block-diagonal causal), its RoPE positions start at 0 and no position
is scored against the next document's first token, so each document's logits equal its logits
alone. Padding never counts in the router statistics.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dbrx_train import compat
from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.moe import (
    DbrxFFN,
    DbrxRouter,
    ExpertGLU,
    MoEBackend,
    RouterStats,
    StepTotals,
    resolve_moe_backend,
)
from dbrx_train.vocab import IGNORE_INDEX

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), fp32, as non-persistent buffers.

    Non-persistent: they are derived from the config, so they stay out of checkpoints (as in HF).
    Note `model.to(torch.bfloat16)` casts buffers too; keep the model in fp32 and use autocast or
    FSDP mixed precision to keep long-context positions exact.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos_TR", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin_TR", torch.empty(max_seq_len, head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        device = self.cos_TR.device
        # Same expression as transformers' DbrxRotaryEmbedding, so the tables are bit-identical.
        exponent_R = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        )
        inv_freq_R = 1.0 / (self.theta**exponent_R)
        positions_T = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        angles_TR = torch.outer(positions_T, inv_freq_R)
        self.cos_TR.copy_(angles_TR.cos())
        self.sin_TR.copy_(angles_TR.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        return self.cos_TR[:seq_len], self.sin_TR[:seq_len]

    def at(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, R) tables for explicit per-token positions (padded batches, KV-cached decoding)."""
        if int(positions_BT.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions_BT.max())} exceeds max_seq_len={self.max_seq_len}")
        return self.cos_TR[positions_BT], self.sin_TR[positions_BT]


class RopeTables:
    """The cos/sin tables a block receives: a plain object, not tensors, so that FSDP2's mixed
    precision (cast_forward_inputs) leaves them fp32. Cast to bf16 in the forward pass but not when
    activation checkpointing recomputes the block (FSDP2 casts inputs only in the forward), they made
    the recomputation differ (torch's CheckpointError), and bf16 tables lose RoPE's precision at
    large positions."""

    __slots__ = ("cos_TR", "sin_TR")

    def __init__(self, cos_TR: torch.Tensor, sin_TR: torch.Tensor):
        self.cos_TR, self.sin_TR = cos_TR, sin_TR


def apply_rope(x_BTHDh: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + Dh/2): HF's rotate_half layout, so Wqkv weights are interchangeable."""
    x1, x2 = x_BTHDh.float().chunk(2, dim=-1)  # fp32: bf16 rotations drift at large positions
    cos, sin = cos_TR.unsqueeze(-2), sin_TR.unsqueeze(-2)  # (T|B,T, 1, R): broadcast over heads
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x_BTHDh.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class DbrxAttention(nn.Module):
    """Causal grouped-query self-attention with a fused q|k|v projection and optional qkv clipping."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        attn = config.attn_config
        self.n_heads, self.kv_n_heads, self.head_dim = config.n_heads, attn.kv_n_heads, config.head_dim
        self.clip_qkv = attn.clip_qkv
        self.attn_pdrop = attn.attn_pdrop
        kv_dim = self.kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        mask_BTS: AttentionMask = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """Causal when `mask_BTS` is None (training); else query t may read key s iff mask[b, t, s]
        (a bool tensor for sdpa, or FlexAttention's BlockMask of packed documents, see
        `document_layout`). With `cache`, k and v are written at positions [start, start + T) and all
        S = start + T cached keys are attended to."""
        B, T, D = x_BTD.shape
        H, K, Dh = self.n_heads, self.kv_n_heads, self.head_dim
        qkv = self.Wqkv(x_BTD)
        if self.clip_qkv is not None:
            # DBRX bounds the projections to keep attention logits from blowing up in training.
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([H * Dh, K * Dh, K * Dh], dim=-1)
        q_BTHDh = apply_rope(q.view(B, T, H, Dh), cos_TR, sin_TR)
        k_BTKDh = apply_rope(k.view(B, T, K, Dh), cos_TR, sin_TR)
        v_BTKDh = v.view(B, T, K, Dh)

        q_BHTDh, k_BKTDh, v_BKTDh = (t.transpose(1, 2) for t in (q_BTHDh, k_BTKDh, v_BTKDh))
        if isinstance(mask_BTS, BlockMask):  # packed documents on CUDA: block-sparse, GQA native
            o_BHTDh = flex_attention_kernel(q_BHTDh.device)(
                q_BHTDh, k_BKTDh, v_BKTDh, block_mask=mask_BTS, enable_gqa=K != H
            )
            return self.out_proj(o_BHTDh.transpose(1, 2).reshape(B, T, D))
        if cache is not None:
            k_BKTDh, v_BKTDh = cache.update(k_BKTDh, v_BKTDh)  # now T = S, every cached position
        if K != H:
            # Query head h reads kv head h // (H/K). Repeating beats sdpa's enable_gqa=True on CPU
            # torch 2.7 (~3x: enable_gqa falls back to the math kernel there) and still reaches the
            # fused CUDA kernels.
            k_BHTDh = k_BKTDh.repeat_interleave(H // K, dim=1)
            v_BHTDh = v_BKTDh.repeat_interleave(H // K, dim=1)
        else:
            k_BHTDh, v_BHTDh = k_BKTDh, v_BKTDh
        o_BHTDh = attention_kernel(
            q_BHTDh,
            k_BHTDh,
            v_BHTDh,
            attn_mask=None if mask_BTS is None else mask_BTS[:, None],
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=mask_BTS is None,
        )
        return self.out_proj(o_BHTDh.transpose(1, 2).reshape(B, T, D))


def attention_kernel(q, k, v, **kwargs) -> torch.Tensor:
    """sdpa; on CPU in fp32 when the inputs are bf16 (autocast): torch 2.7's CPU flash-attention
    backward is slower in bf16 than in fp32 (docs/performance.md), and fp32 is the more exact."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class LayerKVCache(NamedTuple):
    """One layer's slice of a KVCache: views into the cache tensors, written in place."""

    k_BKSDh: torch.Tensor
    v_BKSDh: torch.Tensor
    start: int  # positions already filled

    def update(self, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k_BKTDh.shape[2]
        self.k_BKSDh[:, :, self.start : end] = k_BKTDh
        self.v_BKSDh[:, :, self.start : end] = v_BKTDh
        # In the activations' dtype: under autocast or FSDP mixed precision they are bf16 while the
        # cache was allocated in the weights' dtype (a no-op when they agree).
        return self.k_BKSDh[:, :, :end].to(k_BKTDh.dtype), self.v_BKSDh[:, :, :end].to(v_BKTDh.dtype)


class KVCache:
    """Keys and values of every layer for up to `max_len` positions of B sequences, filled left to
    right by successive forwards; `mask_BS` marks which filled positions hold real tokens (False:
    left padding), so a padded batch decodes as if each sequence were alone."""

    def __init__(self, config: DbrxConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        K, Dh = config.attn_config.kv_n_heads, config.head_dim
        shape = (config.n_layers, batch_size, K, max_len, Dh)
        self.k_LBKSDh = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBKSDh = torch.zeros(shape, device=device, dtype=dtype)
        self.mask_BS = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.mask_BS.shape[1]

    def layer(self, i: int) -> LayerKVCache:
        return LayerKVCache(self.k_LBKSDh[i], self.v_LBKSDh[i], self.length)


def attention_layout(
    attention_mask_BT: torch.Tensor | None,
    position_ids_BT: torch.Tensor | None,
    cache: KVCache | None,
    input_ids_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids_BT, mask_BTS) for a padded and/or cached forward.

    Positions count real tokens only (a left-padded sequence starts at 0, as in HF generate). Query
    t (absolute index start + t) reads key s iff s is a real token and s <= start + t; a padding
    query also reads itself, so no softmax row is empty (NaN). Writes this step's mask into `cache`.
    """
    B, T = input_ids_BT.shape
    if attention_mask_BT is None:
        attention_mask_BT = torch.ones(B, T, dtype=torch.bool, device=input_ids_BT.device)
    start = 0
    key_mask_BS = attention_mask_BT.bool()
    if cache is not None:
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} + {T} do not fit")
        cache.mask_BS[:, start : start + T] = key_mask_BS
        key_mask_BS = cache.mask_BS[:, : start + T]
    if position_ids_BT is None:
        position_ids_BT = (key_mask_BS.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    q_T1 = torch.arange(start, start + T, device=input_ids_BT.device)[:, None]
    k_1S = torch.arange(start + T, device=input_ids_BT.device)[None, :]
    mask_BTS = (key_mask_BS[:, None, :] & (k_1S <= q_T1)) | (k_1S == q_T1)
    return position_ids_BT, mask_BTS


AttentionMask = torch.Tensor | BlockMask | None  # None: plain causal


def document_positions(sequence_id_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids_BT, starts_BT): each token's position within its document (restarting at 0)
    and where a document starts (a change of id; position 0 of a row included)."""
    T = sequence_id_BT.shape[1]
    starts_BT = torch.ones_like(sequence_id_BT, dtype=torch.bool)
    starts_BT[:, 1:] = sequence_id_BT[:, 1:] != sequence_id_BT[:, :-1]
    t_T = torch.arange(T, device=sequence_id_BT.device)
    first_BT = torch.where(starts_BT, t_T, 0).cummax(dim=1).values
    return t_T - first_BT, starts_BT


def document_layout(sequence_id_BT: torch.Tensor, kernel: str) -> tuple[torch.Tensor | None, AttentionMask]:
    """(position_ids_BT, mask) for rows of packed documents; (None, None) (plain causal: the same
    result, the fastest kernel) when no row holds more than one document before its padding.

    kernel "sdpa": a (B, T, T) bool mask, query t reads key s iff s <= t in the same document (a
    padding run counts as one, so no softmax row is empty); "flex": the same as FlexAttention's
    BlockMask, whose kernel skips the blocks outside every document.
    """
    if bool((sequence_id_BT.diff(dim=1) <= 0).all()):  # ids only fall: one document, then padding
        return None, None
    position_ids_BT, _ = document_positions(sequence_id_BT)
    B, T = sequence_id_BT.shape
    if kernel == "flex":
        compat.check("flex_block_mask_compile")

        def same_document_causal(b, h, q, kv):
            return (sequence_id_BT[b, q] == sequence_id_BT[b, kv]) & (kv <= q)

        mask = create_block_mask(
            same_document_causal, B, None, T, T, device=sequence_id_BT.device, _compile=sequence_id_BT.is_cuda
        )
        return position_ids_BT, mask
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=sequence_id_BT.device).tril()
    return position_ids_BT, (sequence_id_BT[:, :, None] == sequence_id_BT[:, None, :]) & causal_TT


def flex_attention_kernel(device: torch.device) -> Callable:
    """FlexAttention compiled once per process on CUDA (its fast kernel); elsewhere the eager
    reference, which only tests use (CPU document masking runs sdpa)."""
    return _compiled_flex_attention() if device.type == "cuda" else flex_attention


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def document_kernel(device_type: str, attn_dropout: bool) -> str:
    """The attention kernel for packed documents on this device, chosen once and logged: FlexAttention
    on CUDA (block-sparse: the cost falls with the documents' lengths), sdpa with a bool mask on CPU
    and wherever attention dropout is on (FlexAttention has none)."""
    kernel = "flex" if device_type == "cuda" and not attn_dropout else "sdpa"
    log.info(
        "document masking: %s on %s",
        "FlexAttention (block-sparse, compiled)"
        if kernel == "flex"
        else "scaled_dot_product_attention with a bool mask",
        device_type,
    )
    return kernel


class NormAttnNormOutput(NamedTuple):
    resid_BTD: torch.Tensor  # x + attention(x): the residual stream entering the FFN
    normed_BTD: torch.Tensor  # norm_2 of it: the FFN's input


class DbrxNormAttentionNorm(nn.Module):
    """Pre-norm attention plus the FFN's pre-norm, grouped as in HF so parameter names match."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.resid_pdrop = config.resid_pdrop
        self.norm_1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = DbrxAttention(config)
        self.norm_2 = nn.LayerNorm(config.d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        mask_BTS: AttentionMask = None,
        cache: LayerKVCache | None = None,
    ) -> NormAttnNormOutput:
        a_BTD = self.attn(self.norm_1(x_BTD), cos_TR, sin_TR, mask_BTS, cache)
        resid_BTD = x_BTD + F.dropout(a_BTD, p=self.resid_pdrop, training=self.training)
        return NormAttnNormOutput(resid_BTD, self.norm_2(resid_BTD))


# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------
class BlockOutput(NamedTuple):
    h_BTD: torch.Tensor
    aux_loss: torch.Tensor  # this layer's load-balancing loss, unweighted
    router_logits_NE: torch.Tensor
    z_loss: torch.Tensor  # this layer's router z-loss, unweighted
    router_stats: RouterStats


class DbrxBlock(nn.Module):
    def __init__(self, config: DbrxConfig, moe_backend: MoEBackend):
        super().__init__()
        self.resid_pdrop = config.resid_pdrop
        self.norm_attn_norm = DbrxNormAttentionNorm(config)
        self.ffn = DbrxFFN(config.d_model, config.ffn_config, moe_backend)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: RopeTables,
        mask_BTS: AttentionMask = None,
        cache: LayerKVCache | None = None,
        token_mask_N: torch.Tensor | None = None,
        totals: StepTotals | None = None,
    ) -> BlockOutput:
        B, T, D = x_BTD.shape
        resid_BTD, normed_BTD = self.norm_attn_norm(x_BTD, rope.cos_TR, rope.sin_TR, mask_BTS, cache)
        moe = self.ffn(normed_BTD.reshape(B * T, D), token_mask_N, totals)
        ffn_BTD = moe.out_ND.view(B, T, D)
        h_BTD = resid_BTD + F.dropout(ffn_BTD, p=self.resid_pdrop, training=self.training)
        return BlockOutput(h_BTD, moe.aux_loss, moe.router_logits_NE, moe.z_loss, moe.stats)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
class ModelOutput(NamedTuple):
    hidden_BTD: torch.Tensor  # after norm_f
    aux_loss: torch.Tensor  # load-balancing loss averaged over layers, unweighted
    router_logits: tuple[torch.Tensor, ...] | None  # one (N, E) per layer, if requested
    z_loss: torch.Tensor  # router z-loss averaged over layers, unweighted
    router_stats: tuple[RouterStats, ...]  # one per layer


class RouterTotals(NamedTuple):
    """The optimizer step's routing, summed by training/ over every microbatch and rank before the
    step's first forward (moe_loss_scope: global); the model only reads it."""

    counts_LE: torch.Tensor  # int64 assignments per layer and expert, counted tokens only
    tokens: torch.Tensor  # int64 0-dim: counted tokens in the step
    samples: int  # samples in the step (the global batch)

    def layer(self, i: int, batch_size: int) -> StepTotals:
        return StepTotals(self.counts_LE[i], self.tokens, self.samples / batch_size)


class DbrxModel(nn.Module):
    def __init__(self, config: DbrxConfig, moe_backend: MoEBackend):
        super().__init__()
        self.emb_pdrop = config.emb_pdrop
        self.attn_pdrop = config.attn_config.attn_pdrop
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DbrxBlock(config, moe_backend) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.attn_config.rope_theta)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        output_router_logits: bool = False,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        sequence_id_BT: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
        router_totals: RouterTotals | None = None,
    ) -> ModelOutput:
        """`sequence_id_BT`: packed documents, each attending only to itself (see `document_layout`);
        `token_mask_BT`: the tokens that count in the router statistics (None: all);
        `router_totals`: the step's routing, for step-wide router losses."""
        mask_BTS: AttentionMask = None
        B, T = input_ids_BT.shape
        if sequence_id_BT is not None:
            if attention_mask_BT is not None or position_ids_BT is not None or cache is not None:
                raise ValueError(
                    "sequence_id (packed training rows) cannot be combined with attention_mask, "
                    "position_ids or a KV cache"
                )
            kernel = document_kernel(input_ids_BT.device.type, self.attn_pdrop > 0)
            position_ids_BT, mask_BTS = document_layout(sequence_id_BT, kernel)
        if position_ids_BT is None and attention_mask_BT is None and cache is None:
            cos_TR, sin_TR = self.rotary(T)  # training: plain causal
        elif sequence_id_BT is not None:
            cos_TR, sin_TR = self.rotary.at(position_ids_BT)
        else:
            position_ids_BT, mask_BTS = attention_layout(
                attention_mask_BT, position_ids_BT, cache, input_ids_BT
            )
            cos_TR, sin_TR = self.rotary.at(position_ids_BT)
        rope = RopeTables(cos_TR, sin_TR)
        token_mask_N = None if token_mask_BT is None else token_mask_BT.reshape(B * T)
        h_BTD = F.dropout(self.wte(input_ids_BT), p=self.emb_pdrop, training=self.training)
        aux_loss = h_BTD.new_zeros((), dtype=torch.float32)
        z_loss = h_BTD.new_zeros((), dtype=torch.float32)
        router_logits, router_stats = [], []
        for i, block in enumerate(self.blocks):
            totals = None if router_totals is None else router_totals.layer(i, B)
            layer_cache = None if cache is None else cache.layer(i)
            out = block(h_BTD, rope, mask_BTS, layer_cache, token_mask_N, totals)
            h_BTD, aux_loss, z_loss = out.h_BTD, aux_loss + out.aux_loss, z_loss + out.z_loss
            router_stats.append(out.router_stats)
            if output_router_logits:
                router_logits.append(out.router_logits_NE)
        if cache is not None:
            cache.length += input_ids_BT.shape[1]
        return ModelOutput(
            self.norm_f(h_BTD),
            aux_loss / len(self.blocks),
            tuple(router_logits) if output_router_logits else None,
            z_loss / len(self.blocks),
            tuple(router_stats),
        )


# ---------------------------------------------------------------------------------------------
# Causal language model
# ---------------------------------------------------------------------------------------------
class CausalLMOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V); None for `router_only`
    loss: torch.Tensor | None  # lm_loss + aux_loss + z_loss, when labels are given
    lm_loss: torch.Tensor | None  # token-mean next-token cross-entropy, when labels are given
    aux_loss: torch.Tensor  # moe_loss_weight * load-balancing loss averaged over layers; 0-dim
    router_logits: tuple[torch.Tensor, ...] | None  # per layer (N, E), when output_router_logits
    past_key_values: KVCache | None = None  # the (updated) cache, when one was used
    z_loss: torch.Tensor | None = None  # moe_z_loss_weight * router z-loss averaged over layers; 0-dim
    router_stats: tuple[RouterStats, ...] | None = None  # per layer: routing of the counted tokens


def document_labels(labels_BT: torch.Tensor, sequence_id_BT: torch.Tensor | None) -> torch.Tensor:
    """`labels` with each document's first token ignored (IGNORE_INDEX), so the last position of a
    document is never scored against the next one's first token (labels are shifted by the loss)."""
    if sequence_id_BT is None:
        return labels_BT
    _, starts_BT = document_positions(sequence_id_BT)
    return labels_BT.masked_fill(starts_BT, IGNORE_INDEX)


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Position t is scored against token t+1; the last position has no target (IGNORE_INDEX)."""
    targets_BT = labels_BT.roll(-1, dims=1)
    targets_BT[:, -1] = IGNORE_INDEX
    return targets_BT


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """HF convention: labels are aligned with input_ids and shifted here; -100 is ignored.

    Token mean over the non-ignored targets, in fp32 (NaN if every target is -100). The labels are
    shifted, not the logits: slicing (B, T, V) logits would copy them and, in backward, zero-fill
    and copy a second logits-sized gradient (~30% of a CPU step with a 100k vocabulary).
    """
    V = logits_BTV.shape[-1]
    targets_N = shift_labels(labels_BT).reshape(-1)
    return F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_N, ignore_index=IGNORE_INDEX)


class DbrxForCausalLM(nn.Module):
    def __init__(self, config: DbrxConfig, moe_backend: MoEBackend | None = None):
        """`moe_backend`: the experts' backend, resolved by the caller for the device the model will run
        on (training/ does, with the run's device); None: `ffn_config.moe_backend` on this machine."""
        super().__init__()
        config.validate()
        self.config = config
        if moe_backend is None:
            moe_backend = resolve_moe_backend(config.ffn_config.moe_backend)
        self.moe_backend = moe_backend  # every layer's experts were built by it
        self.transformer = DbrxModel(config, moe_backend)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # (logits, labels) -> loss; model/compile.py may swap in a compiled one.
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss
        # On meta there is nothing to fill; the caller runs init_weights() after to_empty().
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        router_totals: RouterTotals | None = None,
        router_only: bool = False,
        logits_positions: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Training: `forward(input_ids, labels)`, with `sequence_id` (B, T) for packed rows (-1 on
        padding, which never counts in the router statistics) and, for step-wide router losses, the
        step's `router_totals`. `router_only` stops after the last block: only the router statistics
        (and losses) are returned, no logits and no LM loss. Inference may add a left-padding
        `attention_mask` (B, T_past + T) and a `past_key_values` KVCache (`use_cache=True` creates
        one sized max_seq_len), which is filled in place and returned in the output.
        `logits_positions` (B, C): return logits (B, C, V) at these positions only; the LM head never
        sees the others (scoring a few answer tokens, or sampling one, costs a fraction of the head)."""
        plain = past_key_values is None and not use_cache
        if attention_mask is not None and plain and bool(attention_mask.all()):
            attention_mask = None  # all ones: the plain causal path
        if attention_mask is not None and labels is not None:
            raise NotImplementedError(
                "attention_mask with zeros (padding) is not supported in training: this model trains on "
                "packed, unpadded sequences; mask padded positions in `labels` with -100 instead"
            )
        if use_cache and past_key_values is None:
            B, dtype = input_ids.shape[0], self.lm_head.weight.dtype
            past_key_values = KVCache(self.config, B, self.config.max_seq_len, input_ids.device, dtype)
        if attention_mask is not None and past_key_values is not None:
            attention_mask = attention_mask[:, past_key_values.length :]  # HF passes past + new
        ffn = self.config.ffn_config
        token_mask_BT = None if sequence_id is None else sequence_id >= 0
        if ffn.moe_balance_tokens == "targets" and labels is not None:
            trained_BT = labels != IGNORE_INDEX
            token_mask_BT = trained_BT if token_mask_BT is None else token_mask_BT & trained_BT
        if not self.config.attn_config.attn_uses_sequence_id:
            sequence_id = None  # packed documents see each other (LLM Foundry's default)
        out = self.transformer(
            input_ids,
            output_router_logits=self.config.output_router_logits,
            attention_mask_BT=attention_mask,
            position_ids_BT=position_ids,
            cache=past_key_values,
            sequence_id_BT=sequence_id,
            token_mask_BT=token_mask_BT,
            router_totals=router_totals,
        )
        aux_loss = ffn.moe_loss_weight * out.aux_loss
        z_loss = ffn.moe_z_loss_weight * out.z_loss
        if router_only:
            return CausalLMOutput(
                None, None, None, aux_loss, out.router_logits, None, z_loss, out.router_stats
            )
        hidden_BTD = out.hidden_BTD
        if logits_positions is not None:
            if labels is not None:
                raise ValueError("logits_positions is for inference: the loss needs every position's logits")
            index_BCD = logits_positions[..., None].expand(-1, -1, hidden_BTD.shape[-1])
            hidden_BTD = hidden_BTD.gather(1, index_BCD)
        logits_BTV = self.lm_head(hidden_BTD)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_fn(logits_BTV, document_labels(labels, sequence_id))
            loss = lm_loss + aux_loss + z_loss
        return CausalLMOutput(
            logits_BTV, loss, lm_loss, aux_loss, out.router_logits, past_key_values, z_loss, out.router_stats
        )

    @torch.no_grad()
    def init_non_hf_state(self) -> None:
        """Fill what no HF folder holds, after `to_empty()`: the RoPE tables and (bias balancing) the
        routers' expert biases, which start at zero."""
        self.transformer.rotary.init_weights()
        for module in self.modules():
            if isinstance(module, DbrxRouter) and module.expert_bias is not None:
                module.expert_bias.zero_()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fill every parameter and the RoPE buffers in place, on whatever device they live.

        Linear, embedding, router and expert weights ~ N(0, initializer_range), as HF DBRX. The two
        projections that write into the residual stream (attention out_proj and expert w2) use
        std / sqrt(2 * n_layers) (GPT-2, LLM Foundry `init_div_is_residual`), so the residual
        stream's variance stays O(1) in depth instead of growing with 2 * n_layers additions.
        LayerNorm weights = 1. `seed` makes the result independent of the global RNG.
        """
        device = self.lm_head.weight.device
        gen = None
        if seed is not None and device.type != "meta":
            gen = torch.Generator(device=device).manual_seed(seed)
        if self.config.tie_word_embeddings:
            # to_empty() re-creates each module's parameters separately, which unties them.
            self.lm_head.weight = self.transformer.wte.weight
        for module in self.modules():
            self.init_module(module, generator=gen)

    @torch.no_grad()
    def init_module(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """Fill only `module`'s own parameters and buffers (not its children's).

        Per module, so a sharded model built on `meta` can be initialised shard by shard after
        FSDP (Composer calls this as `param_init_fn` for each module that still holds meta tensors).
        """
        cfg = self.config
        std = cfg.initializer_range
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        if isinstance(module, RotaryEmbedding):
            module.init_weights()
        elif isinstance(module, DbrxRouter) and module.expert_bias is not None:
            module.expert_bias.zero_()  # its Linear child is filled below, as its own module
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std, generator=generator)
        elif isinstance(module, nn.Linear):
            if module is self.lm_head and cfg.tie_word_embeddings:
                return  # shares wte's weight, already filled
            is_residual = any(
                module is block.norm_attn_norm.attn.out_proj for block in self.transformer.blocks
            )
            module.weight.normal_(0.0, resid_std if is_residual else std, generator=generator)
        elif isinstance(module, ExpertGLU):
            module.w1.normal_(0.0, std, generator=generator)
            module.v1.normal_(0.0, std, generator=generator)
            module.w2.normal_(0.0, resid_std, generator=generator)


@torch.no_grad()
def topk_change_without_expert_bias(model: nn.Module, forward: Callable[[], Any]) -> torch.Tensor:
    """What dropping the expert biases (bias balancing) does to routing: runs `forward()` (a forward
    of `model`, or of a wrapper around it, e.g. a held-out batch) and returns, per layer, (tokens
    whose set of top-k experts differs without the bias, tokens) as an int64 (L, 2) tensor. Each
    layer is judged on the hidden states of the model with its biases."""
    routers = [m for m in model.modules() if isinstance(m, DbrxRouter) and m.expert_bias is not None]
    changed: list[torch.Tensor] = []

    def compare(_router: nn.Module, _inputs: Any, routing: Any) -> None:
        unbiased_Nk = torch.topk(routing.probs_NE, routing.experts_Nk.shape[-1], dim=-1).indices
        differs_N = (unbiased_Nk.sort(-1).values != routing.experts_Nk.sort(-1).values).any(-1)
        changed.append(
            torch.stack([differs_N.sum(), torch.tensor(differs_N.numel(), device=differs_N.device)])
        )

    handles = [router.register_forward_hook(compare) for router in routers]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(changed) if changed else torch.zeros(0, 2, dtype=torch.int64)


def describe_topk_change(changed_L2: torch.Tensor) -> str:
    """One line for an export log: overall and worst-layer share of tokens whose top-k changes."""
    changed, tokens = changed_L2[:, 0].double(), changed_L2[:, 1].double().clamp_min(1)
    per_layer = changed / tokens
    return (
        f"without the expert biases the top-k experts of {changed.sum() / tokens.sum():.2%} of the held-out "
        f"tokens' routing decisions change ({int(tokens[0])} tokens x {len(per_layer)} layers; worst layer "
        f"{int(per_layer.argmax())}: {per_layer.max():.2%})"
    )
