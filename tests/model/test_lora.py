"""LoRA: expert adapters against a dense loop over experts with merged weights, PEFT's attention
adapters, merging, and PEFT loading our adapter folder onto transformers' DBRX."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.model import DbrxConfig, DbrxFFNConfig, DbrxForCausalLM
from dbrx_train.model.lora import (
    LoraExperts,
    LoraSpec,
    adapter_param_init,
    adapter_shapes,
    apply_lora,
    count_adapter_params,
    hf_name,
    is_adapter,
    merged_weight,
)
from dbrx_train.model.lora_export import peft_unsupported, write_peft_folder
from dbrx_train.model.moe import DbrxFFN, TorchBackend

D, FF, E = 16, 24, 4


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """B starts at zero (the adapted model equals its base); give every adapter a real update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def dense_reference(
    ffn: DbrxFFN, lora: torch.nn.ModuleDict, scaling: float, x_ND: torch.Tensor
) -> torch.Tensor:
    """Each expert e over the tokens routed to it only, with x (W_e + scaling * B_e A_e) merged weights."""
    routing = ffn.router(x_ND)
    mlp = ffn.experts.mlp

    def merged(target: str, e: int) -> torch.Tensor:  # expert e's weight in its stored (F, D) layout
        w = mlp.per_expert(getattr(mlp, target))[e]
        if target not in lora:
            return w
        delta = scaling * lora[target].lora_B[e] @ lora[target].lora_A[e]  # (out, in)
        return w + (delta.t() if target == "w2" else delta)

    out = torch.zeros_like(x_ND)
    for e in range(E):
        token, slot = (routing.experts_Nk == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        x_e = x_ND[token]
        glu = F.silu(x_e @ merged("w1", e).t()) * (x_e @ merged("v1", e).t())
        y_e = glu @ merged("w2", e)
        out = out.index_add(0, token, routing.weights_Nk[token, slot, None].to(y_e.dtype) * y_e)
    return out


@pytest.mark.parametrize("targets", [("w1", "v1", "w2"), ("v1",), ("w2",)])
def test_expert_adapters_equal_a_dense_loop_with_merged_weights(targets):
    torch.manual_seed(0)
    cfg = DbrxFFNConfig(ffn_hidden_size=FF, moe_num_experts=E, moe_top_k=2)
    ffn = DbrxFFN(D, cfg, TorchBackend()).double()
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    spec = LoraSpec(targets, r=3, alpha=6.0)
    ffn.experts = LoraExperts(ffn.experts, spec).double()
    ffn.requires_grad_(False)
    randomize_adapters(ffn)
    adapters = [p.requires_grad_(True) for p in ffn.experts.lora.parameters()]
    x = torch.randn(30, D, dtype=torch.float64)
    x[:6] = x[6:12]  # some tokens share their routing; one expert may get no rows at all

    got = ffn(x).out_ND
    expected = dense_reference(ffn, ffn.experts.lora, spec.scaling, x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, adapters, grad_out)
    expected_grads = torch.autograd.grad(expected, adapters, grad_out)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    assert ffn.experts.mlp.w1.grad is None  # the base is frozen


def small_model(seed: int = 0, **ffn) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    return DbrxForCausalLM(
        DbrxConfig.from_dict(
            {
                "d_model": 32,
                "n_heads": 4,
                "n_layers": 2,
                "vocab_size": 97,
                "max_seq_len": 32,
                "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
                "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2, **ffn},
            }
        )
    )


ALL = LoraSpec(("Wqkv", "out_proj", "w1", "v1", "w2"), r=4, alpha=8.0)


def test_adapted_model_starts_as_its_base_and_trains_only_adapters():
    model = small_model()
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids).logits
    apply_lora(model, ALL)
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_shapes(model.config, ALL)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count_adapter_params(
        model.config, ALL
    )
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not is_adapter(n))
    grads = {n: p.grad for n, p in model.named_parameters() if is_adapter(n)}
    # B is zero at the start, so only B gets a gradient in the first step (as in PEFT).
    assert all((g.abs().sum() > 0) == (".lora_B" in n) for n, g in grads.items()), grads.keys()


def test_merged_weights_give_the_adapted_models_logits():
    model = small_model()
    apply_lora(model, ALL)
    randomize_adapters(model)
    ids = torch.randint(0, 97, (2, 12))
    adapted = model(ids).logits
    state = model.state_dict()
    adapters = {n: t for n, t in state.items() if is_adapter(n)}
    merged = small_model(seed=1)
    merged.load_state_dict(
        {
            hf_name(n): merged_weight(hf_name(n), t, adapters, ALL.scaling)
            for n, t in state.items()
            if not is_adapter(n)
        }
    )
    assert not torch.allclose(merged(ids).logits, small_model()(ids).logits, atol=1e-3)  # adapters mattered
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_adapters_built_on_meta_initialise_like_peft():
    with torch.device("meta"):
        model = small_model()
        apply_lora(model, ALL)
    model.to_empty(device="cpu")
    init = adapter_param_init(model)
    for module in model.modules():
        init(module)
    for name, p in model.named_parameters():
        if ".lora_B" in name:
            assert torch.all(p == 0), name
        elif ".lora_A" in name:
            assert p.abs().max() > 0 and p.abs().max() <= 1 / p.shape[-1] ** 0.5 + 1e-6, name  # kaiming bound
        elif name.endswith("norm_1.weight"):
            assert torch.all(p == 1)


def test_peft_loads_our_attention_adapters_onto_transformers_dbrx(tmp_path):
    import transformers
    from peft import PeftModel

    spec = LoraSpec(("Wqkv", "out_proj"), r=4, alpha=8.0)
    assert "merged" in peft_unsupported(ALL) and peft_unsupported(spec) is None
    base = small_model()
    hf = transformers.DbrxForCausalLM(transformers.DbrxConfig(**base.config.to_hf_dict())).eval()
    hf.load_state_dict(base.state_dict())
    apply_lora(base, spec)
    randomize_adapters(base)
    adapters = {n: t for n, t in base.state_dict().items() if is_adapter(n)}
    write_peft_folder(tmp_path / "peft", spec, adapters, base_model="the-base")
    with pytest.raises(ValueError, match="merged"):
        write_peft_folder(tmp_path / "experts", ALL, adapters)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about missing or unexpected adapter keys
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    loaded = peft_model.load_adapter(tmp_path / "peft", adapter_name="again")
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, base.eval()(ids).logits, atol=1e-4, rtol=0)
