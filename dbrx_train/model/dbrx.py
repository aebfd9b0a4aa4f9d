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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.moe import DbrxFFN, ExpertGLU
from dbrx_train.vocab import IGNORE_INDEX


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
        mask_BTS: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """Causal when `mask_BTS` is None (training); else query t may read key s iff mask[b, t, s].
        With `cache`, k and v are written at positions [start, start + T) and all S = start + T
        cached keys are attended to."""
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
        o_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh,
            k_BHTDh,
            v_BHTDh,
            attn_mask=None if mask_BTS is None else mask_BTS[:, None],
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=mask_BTS is None,
        )
        return self.out_proj(o_BHTDh.transpose(1, 2).reshape(B, T, D))


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
        mask_BTS: torch.Tensor | None = None,
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


class DbrxBlock(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.resid_pdrop = config.resid_pdrop
        self.norm_attn_norm = DbrxNormAttentionNorm(config)
        self.ffn = DbrxFFN(config.d_model, config.ffn_config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        mask_BTS: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> BlockOutput:
        B, T, D = x_BTD.shape
        resid_BTD, normed_BTD = self.norm_attn_norm(x_BTD, cos_TR, sin_TR, mask_BTS, cache)
        moe = self.ffn(normed_BTD.reshape(B * T, D))
        ffn_BTD = moe.out_ND.view(B, T, D)
        h_BTD = resid_BTD + F.dropout(ffn_BTD, p=self.resid_pdrop, training=self.training)
        return BlockOutput(h_BTD, moe.aux_loss, moe.router_logits_NE)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
class ModelOutput(NamedTuple):
    hidden_BTD: torch.Tensor  # after norm_f
    aux_loss: torch.Tensor  # load-balancing loss averaged over layers, unweighted
    router_logits: tuple[torch.Tensor, ...] | None  # one (N, E) per layer, if requested


class DbrxModel(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.emb_pdrop = config.emb_pdrop
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DbrxBlock(config) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.attn_config.rope_theta)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        output_router_logits: bool = False,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        mask_BTS = None
        if attention_mask_BT is None and position_ids_BT is None and cache is None:
            cos_TR, sin_TR = self.rotary(input_ids_BT.shape[1])  # training: plain causal
        else:
            position_ids_BT, mask_BTS = attention_layout(
                attention_mask_BT, position_ids_BT, cache, input_ids_BT
            )
            cos_TR, sin_TR = self.rotary.at(position_ids_BT)
        h_BTD = F.dropout(self.wte(input_ids_BT), p=self.emb_pdrop, training=self.training)
        aux_loss = h_BTD.new_zeros((), dtype=torch.float32)
        router_logits = []
        for i, block in enumerate(self.blocks):
            out = block(h_BTD, cos_TR, sin_TR, mask_BTS, None if cache is None else cache.layer(i))
            h_BTD, aux_loss = out.h_BTD, aux_loss + out.aux_loss
            if output_router_logits:
                router_logits.append(out.router_logits_NE)
        if cache is not None:
            cache.length += input_ids_BT.shape[1]
        return ModelOutput(
            self.norm_f(h_BTD),
            aux_loss / len(self.blocks),
            tuple(router_logits) if output_router_logits else None,
        )


# ---------------------------------------------------------------------------------------------
# Causal language model
# ---------------------------------------------------------------------------------------------
class CausalLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # lm_loss + aux_loss, when labels are given
    lm_loss: torch.Tensor | None  # token-mean next-token cross-entropy, when labels are given
    aux_loss: torch.Tensor  # moe_loss_weight * load-balancing loss averaged over layers; 0-dim
    router_logits: tuple[torch.Tensor, ...] | None  # per layer (N, E), when output_router_logits
    past_key_values: KVCache | None = None  # the (updated) cache, when one was used


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
    def __init__(self, config: DbrxConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = DbrxModel(config)
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
        logits_positions: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Training: `forward(input_ids, labels)`. Inference may add a left-padding
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
        out = self.transformer(
            input_ids,
            output_router_logits=self.config.output_router_logits,
            attention_mask_BT=attention_mask,
            position_ids_BT=position_ids,
            cache=past_key_values,
        )
        hidden_BTD = out.hidden_BTD
        if logits_positions is not None:
            if labels is not None:
                raise ValueError("logits_positions is for inference: the loss needs every position's logits")
            index_BCD = logits_positions[..., None].expand(-1, -1, hidden_BTD.shape[-1])
            hidden_BTD = hidden_BTD.gather(1, index_BCD)
        logits_BTV = self.lm_head(hidden_BTD)
        aux_loss = self.config.ffn_config.moe_loss_weight * out.aux_loss
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_fn(logits_BTV, labels)
            loss = lm_loss + aux_loss
        return CausalLMOutput(logits_BTV, loss, lm_loss, aux_loss, out.router_logits, past_key_values)

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
