"""The small DBRX models that in-process tests build (16-expert top-4 is the YAMLs' job; here 4 experts
top-2 keep a forward pass in milliseconds). Seeded, so two calls give the same weights."""

from __future__ import annotations

import torch

from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.config import DbrxConfig
from dbrx_train.vocab import DBRX_VOCAB_SIZE


def tiny_dbrx(
    *, vocab_size: int = 64, max_seq_len: int = 16, d_model: int = 32, n_layers: int = 1
) -> DbrxForCausalLM:
    """4 experts top-2, GQA (kv heads = heads / 2), clip_qkv 8; `d_model` sets the heads (16 per head)
    and the experts' width."""
    n_heads = d_model // 16
    config = DbrxConfig.from_dict(
        {
            "d_model": d_model,
            "n_heads": n_heads,
            "n_layers": n_layers,
            "max_seq_len": max_seq_len,
            "vocab_size": vocab_size,
            "attn_config": {"kv_n_heads": n_heads // 2, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": d_model, "moe_num_experts": 4, "moe_top_k": 2},
        }
    )
    torch.manual_seed(0)
    return DbrxForCausalLM(config)


def text_dbrx(max_seq_len: int) -> DbrxForCausalLM:
    """At DBRX's own vocabulary, for tests that tokenize real text; in eval mode."""
    return tiny_dbrx(vocab_size=DBRX_VOCAB_SIZE, max_seq_len=max_seq_len, d_model=64, n_layers=2).eval()
