"""Compiled regions compute what the eager model computes (CPU, fp32): loss and every gradient."""

import pytest
import torch

from dbrx_train.config.schema import build
from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model.compile import COMPILE_REGIONS, compile_regions

CONFIG = {
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
    "max_seq_len": 32,
    "vocab_size": 512,
    "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
    "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 8, "moe_top_k": 2, "moe_backend": "torch"},
}


def model_pair() -> tuple[DbrxForCausalLM, DbrxForCausalLM]:
    torch.manual_seed(0)
    eager = DbrxForCausalLM(build(DbrxConfig, CONFIG)).train()
    compiled = DbrxForCausalLM(build(DbrxConfig, CONFIG)).train()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def loss_and_grads(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_every_region_compiled_matches_eager():
    eager, compiled = model_pair()
    compile_regions(compiled, COMPILE_REGIONS)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unaffected
    for seed in (0, 1):  # the second batch reuses the compiled code
        ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(seed))
        loss_e, grads_e = loss_and_grads(eager, ids)
        loss_c, grads_c = loss_and_grads(compiled, ids)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(
                grads_c[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
        eager.zero_grad()
        compiled.zero_grad()


def test_unknown_region_is_refused():
    _, compiled = model_pair()
    with pytest.raises(ValueError, match=r"unknown compile region\(s\) \['experts'\]"):
        compile_regions(compiled, ["loss", "experts"])
