"""Whole-model gradients of both MoE backends in bf16 autocast, each against the torch backend in fp32.

Neither bf16 backend is the reference: a gradient on which the two differ by a few percent is only a
problem if megablocks is further from fp32 than the torch backend is. Prints one row per parameter
(normwise relative errors) for a few seeds; needs CUDA and the [gpu] extra.

    python scripts/gpu/grad_error_vs_fp32.py [--seeds 3] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse

import torch

from dbrx_train.config.schema import build
from dbrx_train.model import DbrxConfig, DbrxForCausalLM


def model_config(backend: str, d_model: int = 256, ffn: int = 448) -> DbrxConfig:
    return build(
        DbrxConfig,
        {
            "d_model": d_model,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 128,
            "vocab_size": 1024,
            "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
            "ffn_config": {
                "ffn_hidden_size": ffn,
                "moe_num_experts": 16,
                "moe_top_k": 4,
                "moe_backend": backend,
            },
        },
    )


def grads(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    worst = {"torch": 0.0, "megablocks": 0.0}
    for seed in range(args.seeds):
        models = {}
        for backend in ("torch", "megablocks"):
            torch.manual_seed(seed)
            models[backend] = DbrxForCausalLM(model_config(backend)).cuda().train()
        models["megablocks"].load_state_dict(models["torch"].state_dict())
        gen = torch.Generator(device="cuda").manual_seed(seed)
        ids = torch.randint(0, 1024, (args.batch, args.seq), device="cuda", generator=gen)
        loss32, g32 = grads(models["torch"], ids, bf16=False)
        loss_t, g_t = grads(models["torch"], ids, bf16=True)
        loss_m, g_m = grads(models["megablocks"], ids, bf16=True)
        print(f"seed {seed}: loss fp32 {loss32:.5f}, torch bf16 {loss_t:.5f}, megablocks bf16 {loss_m:.5f}")
        print(f"  {'parameter':58s} {'torch/fp32':>10s} {'mb/fp32':>8s} {'mb/torch':>8s}")
        for name in g32:
            e_t, e_m, e_mt = rel(g_t[name], g32[name]), rel(g_m[name], g32[name]), rel(g_m[name], g_t[name])
            worst["torch"] = max(worst["torch"], e_t)
            worst["megablocks"] = max(worst["megablocks"], e_m)
            flag = "  <- mb worse than 2x torch" if e_m > 2 * e_t + 1e-3 else ""
            print(f"  {name:58s} {e_t:10.2e} {e_m:8.2e} {e_mt:8.2e}{flag}")
    print(
        f"worst gradient error against fp32: torch {worst['torch']:.2e}, megablocks {worst['megablocks']:.2e}"
    )


if __name__ == "__main__":
    main()
