"""Attention and RoPE against slow references written here, with identical weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.model import DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig
from dbrx_train.model.dbrx import DbrxAttention, RotaryEmbedding, apply_rope, attention_kernel


def make_config(n_heads=4, kv_n_heads=2, clip_qkv=None, d_model=32, attn_pdrop=0.0, max_seq_len=16):
    return DbrxConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=1,
        max_seq_len=max_seq_len,
        vocab_size=16,
        attn_config=DbrxAttentionConfig(
            kv_n_heads=kv_n_heads, clip_qkv=clip_qkv, attn_pdrop=attn_pdrop, rope_theta=500.0
        ),
        ffn_config=DbrxFFNConfig(ffn_hidden_size=8, moe_num_experts=2),
    )


def rope_tables(config):
    rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.attn_config.rope_theta)
    rotary.init_weights()
    return rotary


def reference_rope(x_BTHDh, theta):
    """Rotate each pair (i, i + Dh/2) of position t by angle t * theta^(-2i/Dh), one scalar at a time."""
    B, T, H, Dh = x_BTHDh.shape
    half = Dh // 2
    out = torch.empty_like(x_BTHDh)
    for t in range(T):
        for i in range(half):
            angle = t * theta ** (-2.0 * i / Dh)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x_BTHDh[:, t, :, i], x_BTHDh[:, t, :, i + half]
            out[:, t, :, i] = a * c - b * s
            out[:, t, :, i + half] = b * c + a * s
    return out


def reference_attention(attn, x_BTD, rotary, theta):
    """Per-head softmax attention with an explicit causal mask and KV heads chosen by hand."""
    B, T, D = x_BTD.shape
    H, K, Dh = attn.n_heads, attn.kv_n_heads, attn.head_dim
    qkv = x_BTD @ attn.Wqkv.weight.t()
    if attn.clip_qkv is not None:
        qkv = torch.clamp(qkv, -attn.clip_qkv, attn.clip_qkv)
    q = reference_rope(qkv[..., : H * Dh].reshape(B, T, H, Dh), theta)
    k = reference_rope(qkv[..., H * Dh : (H + K) * Dh].reshape(B, T, K, Dh), theta)
    v = qkv[..., (H + K) * Dh :].reshape(B, T, K, Dh)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(H):
        kv = h // (H // K)  # HF's repeat_kv: kv head j serves query heads j*(H/K) .. (j+1)*(H/K)-1
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(Dh)  # (B, T, T)
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.t()


def test_rope_tables_match_closed_form_and_transformers():
    config = make_config()
    rotary = rope_tables(config)
    Dh, theta = config.head_dim, config.attn_config.rope_theta
    t, i = 11, 3
    assert rotary.cos_TR[t, i].item() == pytest.approx(math.cos(t * theta ** (-2 * i / Dh)), abs=1e-6)
    assert rotary.sin_TR[t, i].item() == pytest.approx(math.sin(t * theta ** (-2 * i / Dh)), abs=1e-6)

    from transformers.models.dbrx.modeling_dbrx import DbrxRotaryEmbedding

    hf = DbrxRotaryEmbedding(Dh, base=theta)
    x = torch.zeros(1, 1, config.max_seq_len, Dh)
    cos_hf, sin_hf = hf(x, torch.arange(config.max_seq_len)[None])
    # HF stores cat(freqs, freqs); ours stores one half. Bit-identical values.
    assert torch.equal(cos_hf[0], torch.cat([rotary.cos_TR, rotary.cos_TR], dim=-1))
    assert torch.equal(sin_hf[0], torch.cat([rotary.sin_TR, rotary.sin_TR], dim=-1))


def test_apply_rope_matches_reference():
    torch.manual_seed(0)
    config = make_config()
    rotary = rope_tables(config)
    x = torch.randn(2, 9, 3, config.head_dim)
    cos, sin = rotary(9)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, config.attn_config.rope_theta))
    # A rotation: norms are preserved, position 0 is untouched.
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, cos, sin)[:, 0], x[:, 0])


@pytest.mark.parametrize(
    "n_heads,kv_n_heads,clip_qkv",
    [(4, 4, None), (4, 2, None), (4, 1, None), (8, 2, 0.5), (4, 2, 0.3)],
)
def test_attention_matches_naive_reference(n_heads, kv_n_heads, clip_qkv):
    torch.manual_seed(0)
    config = make_config(n_heads, kv_n_heads, clip_qkv)
    attn = DbrxAttention(config)
    torch.nn.init.normal_(attn.Wqkv.weight, std=0.3)
    rotary = rope_tables(config)
    x = torch.randn(2, 12, config.d_model)
    if clip_qkv is not None:  # make sure the clamp is actually exercised
        assert (x @ attn.Wqkv.weight.t()).abs().max() > clip_qkv

    x_ref = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    expected = reference_attention(attn, x_ref, rotary, config.attn_config.rope_theta)
    got = attn(x_fast, *rotary(12))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(got)
    expected_grads = torch.autograd.grad(expected, [x_ref, attn.Wqkv.weight, attn.out_proj.weight], grad_out)
    got_grads = torch.autograd.grad(got, [x_fast, attn.Wqkv.weight, attn.out_proj.weight], grad_out)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_bf16_attention_on_cpu_runs_the_fp32_kernel_under_autocast():
    """bf16 q/k/v on CPU (amp_bf16) go through sdpa in fp32 and come back bf16, gradients included:
    exactly the fp32 kernel on the bf16 inputs, and autocast does not cast them back down."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=gen).bfloat16().requires_grad_(True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_kernel(q, k, v, is_causal=True)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.bfloat16())
    grad = torch.randn(got.shape, generator=gen).bfloat16()
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad.float())
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == torch.bfloat16 and torch.equal(g, e.bfloat16())


def test_attention_is_causal():
    torch.manual_seed(0)
    config = make_config()
    attn = DbrxAttention(config)
    rotary = rope_tables(config)
    x = torch.randn(1, 10, config.d_model)
    x_changed = x.clone()
    x_changed[:, 6] += 1.0
    out, out_changed = attn(x, *rotary(10)), attn(x_changed, *rotary(10))
    torch.testing.assert_close(out[:, :6], out_changed[:, :6], atol=0, rtol=0)
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    config = make_config(attn_pdrop=0.5)
    attn = DbrxAttention(config)
    rotary = rope_tables(config)
    x = torch.randn(2, 8, config.d_model)
    attn.eval()
    torch.testing.assert_close(attn(x, *rotary(8)), reference_attention(attn, x, rotary, 500.0))
    attn.train()
    assert not torch.allclose(attn(x, *rotary(8)), attn(x, *rotary(8)))


def test_rotary_rejects_sequences_longer_than_max_seq_len():
    rotary = rope_tables(make_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        rotary(9)
