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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.moe import DbrxFFN, ExpertGLU


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


def apply_rope(x_BTHDh: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + Dh/2): HF's rotate_half layout, so Wqkv weights are interchangeable."""
    x1, x2 = x_BTHDh.float().chunk(2, dim=-1)  # fp32: bf16 rotations drift at large positions
    cos, sin = cos_TR[:, None, :], sin_TR[:, None, :]  # broadcast over heads
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

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
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
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=True,
        )
        return self.out_proj(o_BHTDh.transpose(1, 2).reshape(B, T, D))


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

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> NormAttnNormOutput:
        a_BTD = self.attn(self.norm_1(x_BTD), cos_TR, sin_TR)
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

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> BlockOutput:
        B, T, D = x_BTD.shape
        resid_BTD, normed_BTD = self.norm_attn_norm(x_BTD, cos_TR, sin_TR)
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

    def forward(self, input_ids_BT: torch.Tensor, output_router_logits: bool = False) -> ModelOutput:
        cos_TR, sin_TR = self.rotary(input_ids_BT.shape[1])
        h_BTD = F.dropout(self.wte(input_ids_BT), p=self.emb_pdrop, training=self.training)
        aux_loss = h_BTD.new_zeros((), dtype=torch.float32)
        router_logits = []
        for block in self.blocks:
            out = block(h_BTD, cos_TR, sin_TR)
            h_BTD, aux_loss = out.h_BTD, aux_loss + out.aux_loss
            if output_router_logits:
                router_logits.append(out.router_logits_NE)
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


IGNORE_INDEX = -100


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
        # On meta there is nothing to fill; the caller runs init_weights() after to_empty().
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError(
                "attention_mask with zeros (padding) is not supported: this model trains on packed, "
                "unpadded sequences; mask padded positions in `labels` with -100 instead"
            )
        out = self.transformer(input_ids, output_router_logits=self.config.output_router_logits)
        logits_BTV = self.lm_head(out.hidden_BTD)
        aux_loss = self.config.ffn_config.moe_loss_weight * out.aux_loss
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits_BTV, labels)
            loss = lm_loss + aux_loss
        return CausalLMOutput(logits_BTV, loss, lm_loss, aux_loss, out.router_logits)

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
