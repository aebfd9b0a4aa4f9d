"""Whole model: loss, init, meta build, statistics, config, and equality with transformers' DBRX."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.config.schema import ConfigError, build
from dbrx_train.model import (
    DbrxAttentionConfig,
    DbrxConfig,
    DbrxFFNConfig,
    DbrxForCausalLM,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
)
from dbrx_train.model.config import NON_HF_ATTN_KEYS, NON_HF_FFN_KEYS

DBRX_132B = {
    "d_model": 6144,
    "n_heads": 48,
    "n_layers": 40,
    "max_seq_len": 32768,
    "vocab_size": 100352,
    "attn_config": {"kv_n_heads": 8, "clip_qkv": 8.0, "rope_theta": 500000.0},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
}


def tiny_config(**overrides):
    d = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 32,
        "vocab_size": 512,
        "attn_config": {"kv_n_heads": 2},
        "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 8, "moe_top_k": 2, "moe_backend": "torch"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return build(DbrxConfig, d)


def tiny_model(seed=0, **overrides):
    model = DbrxForCausalLM(tiny_config(**overrides))
    model.init_weights(seed=seed)
    return model


def tokens(B=2, T=32, V=512, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Forward and loss
# ---------------------------------------------------------------------------------------------
def test_loss_is_manual_cross_entropy_plus_weighted_load_balancing_loss():
    model = tiny_model(output_router_logits=True)
    x = tokens()
    labels = x.clone()
    labels[0, 5:9] = -100
    out = model(x, labels=labels)
    B, T, V = 2, 32, 512
    assert out.logits.shape == (B, T, V)

    log_probs = torch.log_softmax(out.logits.float(), dim=-1)
    terms = [
        -log_probs[b, t, labels[b, t + 1]] for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100
    ]
    lm = torch.stack(terms).mean()
    torch.testing.assert_close(out.lm_loss, lm)

    k, E = 2, 8
    per_layer = []
    for logits_NE in out.router_logits:
        assert logits_NE.shape == (B * T, E)
        probs = torch.softmax(logits_NE.float(), dim=-1)
        chosen = torch.topk(probs, k, dim=-1).indices
        f = torch.stack([(chosen == e).sum() / (B * T * k) for e in range(E)])
        per_layer.append(E * (f * probs.mean(0)).sum())
    aux = 0.01 * torch.stack(per_layer).mean()
    assert out.aux_loss.shape == ()
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + aux)


def test_aux_loss_in_train_and_eval_without_labels():
    model = tiny_model()
    model.train()
    out = model(tokens())
    assert out.loss is None and out.lm_loss is None and out.router_logits is None
    assert out.aux_loss.shape == () and out.aux_loss.requires_grad and out.aux_loss > 0
    model.eval()
    with torch.no_grad():
        assert model(tokens()).aux_loss > 0


def test_dropout_off_is_deterministic_and_dropout_on_is_not():
    model = tiny_model()
    model.train()
    x = tokens()
    torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)

    noisy = tiny_model(resid_pdrop=0.2, emb_pdrop=0.2, attn_config={"attn_pdrop": 0.2})
    noisy.train()
    assert not torch.allclose(noisy(x).logits, noisy(x).logits)
    noisy.eval()
    torch.testing.assert_close(noisy(x).logits, noisy(x).logits, atol=0, rtol=0)


def test_bf16_autocast_is_close_to_fp32_and_trains():
    model = tiny_model()
    x = tokens()
    fp32 = model(x, labels=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, labels=x)
    assert bf16.logits.dtype == torch.bfloat16 and bf16.aux_loss.dtype == torch.float32
    torch.testing.assert_close(bf16.logits.float(), fp32.logits, atol=2e-2, rtol=0)
    bf16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_mask_with_padding_is_rejected_in_training():
    model = tiny_model()
    x = tokens()
    torch.testing.assert_close(model(x, attention_mask=torch.ones_like(x)).logits, model(x).logits)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="attention_mask"):
        model(x, labels=x, attention_mask=mask)
    # Inference accepts left padding: padded rows give the logits of the unpadded sequence.
    model.eval()
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits
        alone = model(x[:1, 3:]).logits
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=1e-5, rtol=0)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model()
    x = tokens(B=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lm_losses = []
    for _ in range(100):
        out = model(x, labels=x)
        lm_losses.append(out.lm_loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert lm_losses[-1] < 0.1 * lm_losses[0], (lm_losses[0], lm_losses[-1])


# ---------------------------------------------------------------------------------------------
# Initialisation and meta build
# ---------------------------------------------------------------------------------------------
def test_constructing_on_cpu_gives_an_initialised_model():
    model = DbrxForCausalLM(tiny_config(n_layers=8))
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * 8)
    block = model.transformer.blocks[0]
    assert torch.equal(block.norm_attn_norm.norm_1.weight, torch.ones(64))
    assert block.ffn.experts.mlp.w1.std().item() == pytest.approx(std, rel=0.05)
    assert block.ffn.experts.mlp.w2.std().item() == pytest.approx(resid_std, rel=0.05)
    assert block.norm_attn_norm.attn.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
    assert model.transformer.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.isfinite(model(tokens()).logits).all()


def test_init_weights_seed_is_reproducible():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(tiny_model(seed=4).lm_head.weight, a.lm_head.weight)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_to_empty_and_init_weights(tie):
    with torch.device("meta"):
        model = DbrxForCausalLM(tiny_config(tie_word_embeddings=tie))
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    with torch.no_grad():  # init_weights must overwrite every value, buffers included
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    model.init_weights(seed=0)
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()])
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    out = model(tokens(), labels=tokens())
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Same values as a model built directly on CPU with the same seed.
    direct = DbrxForCausalLM(tiny_config(tie_word_embeddings=tie))
    direct.init_weights(seed=0)
    torch.testing.assert_close(direct(tokens()).logits, model(tokens()).logits, atol=0, rtol=0)


def test_rope_buffers_are_not_in_the_state_dict():
    model = tiny_model()
    assert not any("rotary" in key for key in model.state_dict())
    assert model.transformer.rotary.cos_TR.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def test_132b_config_on_meta_has_dbrx_model_card_counts():
    config = build(DbrxConfig, DBRX_132B)
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    counts = count_params(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counts.active == counts.total - expert + expert * 4 // 16
    assert counts.total == pytest.approx(131.6e9, rel=0.005)
    assert counts.active == pytest.approx(36.5e9, rel=0.005)
    # K and V, 40 layers, 8 kv heads of 128 dims, 2 bytes each.
    assert kv_cache_bytes_per_token(config) == 2 * 40 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(config, dtype_bytes=4) == 2 * 2 * 40 * 8 * 128 * 2


@pytest.mark.parametrize("tie", [False, True])
def test_count_params_matches_a_built_model(tie):
    config = tiny_config(tie_word_embeddings=tie, ffn_config={"moe_num_experts": 4, "moe_top_k": 3})
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    assert count_params(config).total == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    config = tiny_config()
    D, V, L, E, k, F_, kv = 64, 512, 2, 8, 2, 96, 2 * 16
    per_layer = 2 * D + D * (D + 2 * kv) + D * D + D * E + 3 * k * F_ * D  # active parameters
    matmul_params = L * per_layer + D + V * D  # norm_f + lm_head; wte is a lookup
    assert flops_per_token(config, 32) == 6 * matmul_params + 12 * L * D * 32


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_config_defaults_and_field_names_equal_transformers():
    import transformers

    hf = transformers.DbrxConfig()
    ours = DbrxConfig()
    for field in dataclasses.fields(DbrxConfig):
        if field.name not in ("attn_config", "ffn_config"):
            assert getattr(ours, field.name) == getattr(hf, field.name), field.name
    for section in ("attn_config", "ffn_config"):
        for field in dataclasses.fields(getattr(ours, section)):
            if field.name in (*NON_HF_ATTN_KEYS, *NON_HF_FFN_KEYS):  # ours, not HF's
                continue
            assert getattr(getattr(ours, section), field.name) == getattr(getattr(hf, section), field.name)
    assert ours.head_dim == 128
    transformers.DbrxConfig(**tiny_config().to_hf_dict())  # HF accepts our export


def test_config_round_trips_through_json():
    config = build(DbrxConfig, DBRX_132B)
    d = json.loads(json.dumps(config.to_dict()))
    assert build(DbrxConfig, d) == config
    assert isinstance(config.attn_config, DbrxAttentionConfig)
    assert isinstance(config.ffn_config, DbrxFFNConfig)


@pytest.mark.parametrize(
    "d,message",
    [
        (
            {"ffn_config": {"moe_topk": 2}},
            r"unknown config key 'ffn_config.moe_topk' \(did you mean 'moe_top_k'\?\)",
        ),
        ({"n_layer": 2}, r"unknown config key 'n_layer' \(did you mean 'n_layers'\?\)"),
        ({"attn_config": {"kv_heads": 2}}, r"unknown config key 'attn_config.kv_heads'"),
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"n_heads": 16, "attn_config": {"kv_n_heads": 3}}, "kv_n_heads"),
        ({"d_model": 48, "n_heads": 16}, "head_dim"),
        ({"ffn_config": {"moe_top_k": 5, "moe_num_experts": 4}}, "moe_top_k"),
        ({"ffn_config": {"moe_top_k": 0}}, "moe_top_k"),
        ({"ffn_config": {"ffn_act_fn": {"name": "swish"}}}, "ffn_act_fn"),
        ({"ffn_config": {"moe_backend": "cuda"}}, "moe_backend"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"ffn_config": {"ffn_hidden_size": -1}}, "ffn_hidden_size"),
        ({"resid_pdrop": 1.5}, "resid_pdrop"),
    ],
)
def test_config_errors_name_the_field(d, message):
    with pytest.raises(ValueError, match=message):
        build(DbrxConfig, d)


def test_every_config_problem_is_reported_at_once_and_model_validate_agrees():
    """One converter: unknown keys, wrong types and bad values of one model dict in one error; and
    `validate()` (for configs built in code) applies the same value checks as the converter."""
    bad = {"n_layer": 2, "d_model": "wide", "ffn_config": {"moe_top_k": 0, "moe_topk": 2}, "resid_pdrop": 1.5}
    with pytest.raises(ConfigError) as raised:
        build(DbrxConfig, bad)
    assert len(raised.value.problems) == 5, raised.value.problems  # 2 unknown, 1 wrong type, 2 bad values
    values = {"ffn_config": {"moe_top_k": 0}, "resid_pdrop": 1.5, "attn_config": {"kv_n_heads": 3}}
    with pytest.raises(ConfigError) as raised:
        build(DbrxConfig, values)
    lines = raised.value.problems
    assert sorted(line.split("'")[1] for line in lines) == [
        "attn_config.kv_n_heads",
        "ffn_config.moe_top_k",
        "resid_pdrop",
    ], lines
    config = DbrxConfig(resid_pdrop=1.5, ffn_config=DbrxFFNConfig(moe_top_k=0))
    with pytest.raises(ValueError, match=r"resid_pdrop must be in \[0, 1\).*ffn_config.moe_top_k must be in"):
        config.validate()


# ---------------------------------------------------------------------------------------------
# Equality with transformers' DbrxForCausalLM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_transformers_dbrx(attn_implementation):
    import transformers

    config = tiny_config(attn_config={"clip_qkv": 0.5}, ffn_config={"ffn_act_fn": {"name": "silu"}})
    ours = DbrxForCausalLM(config).eval()
    with torch.no_grad():  # make clip_qkv bite
        for block in ours.transformer.blocks:
            block.norm_attn_norm.attn.Wqkv.weight.mul_(10)
    hf_config = transformers.DbrxConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    hf = transformers.DbrxForCausalLM(hf_config).eval()

    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert list(our_state) == list(hf_state)
    assert {k: v.shape for k, v in our_state.items()} == {k: v.shape for k, v in hf_state.items()}
    hf.load_state_dict(our_state)

    x = tokens()
    with torch.no_grad():
        got = ours(x, labels=x)
        expected = hf(x, labels=x)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
    # HF adds its aux loss only when output_router_logits=True; without it its loss is the LM loss.
    torch.testing.assert_close(got.lm_loss, expected.loss, atol=1e-5, rtol=0)


def test_activation_choice_matches_transformers():
    import transformers

    for act in ("gelu", "relu"):
        config = tiny_config(n_layers=1, ffn_config={"ffn_act_fn": {"name": act}})
        ours = DbrxForCausalLM(config).eval()
        hf = transformers.DbrxForCausalLM(transformers.DbrxConfig(**config.to_hf_dict())).eval()
        hf.load_state_dict(ours.state_dict())
        x = tokens()
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_lm_loss_ignores_label_positions_like_hf():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 3, 3, 3]])
    from dbrx_train.model.dbrx import causal_lm_loss

    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = F.cross_entropy(logits.view(-1, 7), shifted.view(-1), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
