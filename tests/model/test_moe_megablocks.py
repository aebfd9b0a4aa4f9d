"""The megablocks backend against the torch backend, on CUDA (bf16). Skipped without CUDA + MegaBlocks.

Tolerance: the issue's 1e-2, taken relative to the size of each tensor (normwise, and elementwise
against 1e-2 x its largest entry): weight and router gradients are sums over every token, of order
10 here, where one bf16 rounding step is already 0.06. Both backends compute in bf16 with fp32
accumulation; they differ in summation order and where the routing weight is applied.
"""

import importlib.util

import pytest
import torch

from dbrx_train.config.schema import build
from dbrx_train.model import DbrxConfig, DbrxFFNConfig, DbrxForCausalLM
from dbrx_train.model.moe import DbrxFFN, MegaBlocksExperts, TorchExperts, resolve_moe_backend

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the megablocks backend needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("megablocks") is None or importlib.util.find_spec("grouped_gemm") is None,
        reason="megablocks / grouped_gemm not installed (pip install --no-build-isolation -e .[gpu] on a CUDA machine)",
    ),
]

D, FF = 256, 448


def ffn_pair(num_experts=16, top_k=4, act="silu", **kwargs) -> tuple[DbrxFFN, DbrxFFN]:
    torch.manual_seed(0)
    made = []
    for backend in ("torch", "megablocks"):
        cfg = DbrxFFNConfig(
            ffn_hidden_size=FF,
            moe_num_experts=num_experts,
            moe_top_k=top_k,
            ffn_act_fn={"name": act},
            **kwargs,
        )
        made.append(DbrxFFN(D, cfg, resolve_moe_backend(backend)).cuda())
    ref, mb = made
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mb.load_state_dict(ref.state_dict())  # same names and shapes: checkpoints move between backends
    assert isinstance(ref.experts, TorchExperts) and isinstance(mb.experts, MegaBlocksExperts)
    return ref, mb


def assert_close_bf16(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got, expected = got.float(), expected.float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-2, f"{what}: normwise relative error {rel:.2e}"
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item(), msg=what)


def run_ffn(ffn: DbrxFFN, x: torch.Tensor, grad_seed: int = 1):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ffn(x)
    gen = torch.Generator(device="cuda").manual_seed(grad_seed)
    grad = torch.randn(out.out_ND.shape, device="cuda", generator=gen).to(out.out_ND.dtype)
    (out.out_ND.float() * grad.float()).sum().add(out.aux_loss).backward()
    return out, [x.grad] + [p.grad for p in ffn.parameters()]


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("num_tokens", [1024, 3])  # 3 tokens x top-4 of 16: most experts get no rows
def test_outputs_and_gradients_agree_with_the_torch_backend(act, num_tokens):
    ref, mb = ffn_pair(act=act)
    x = torch.randn(num_tokens, D, device="cuda")
    out_ref, grads_ref = run_ffn(ref, x)
    out_mb, grads_mb = run_ffn(mb, x)
    assert out_mb.out_ND.dtype == torch.bfloat16
    assert_close_bf16(out_mb.out_ND, out_ref.out_ND, "output")
    torch.testing.assert_close(out_mb.aux_loss, out_ref.aux_loss)  # same router, same loss
    names = ["x"] + [name for name, _ in ref.named_parameters()]
    for name, g_mb, g_ref in zip(names, grads_mb, grads_ref, strict=True):
        assert_close_bf16(g_mb, g_ref, f"gradient of {name}")


def test_both_backends_are_as_close_to_fp32():
    """Neither backend is the reference: both are compared with the torch backend in fp32. Both sit
    ~4% from it (seen on an H200): bf16 router logits flip near-tied top-k choices, the same way in
    both backends since they share the router, so only a relative bound is meaningful."""
    ref, mb = ffn_pair()
    x = torch.randn(2048, D, device="cuda")
    with torch.no_grad():
        exact = ref(x).out_ND
        with torch.autocast("cuda", dtype=torch.bfloat16):
            err_torch = (ref(x).out_ND.float() - exact).norm() / exact.norm()
            err_mb = (mb(x).out_ND.float() - exact).norm() / exact.norm()
    assert err_mb < 0.1 and err_mb < 2 * err_torch + 1e-3, (err_mb.item(), err_torch.item())


def test_uniform_expert_assignment_runs_balanced():
    ref, mb = ffn_pair(uniform_expert_assignment=True)
    x = torch.randn(512, D, device="cuda")
    out_ref, _ = run_ffn(ref, x)
    out_mb, _ = run_ffn(mb, x)
    assert_close_bf16(out_mb.out_ND, out_ref.out_ND, "output")


def test_fp32_without_autocast_is_a_clear_error():
    _, mb = ffn_pair()
    with pytest.raises(
        ValueError,
        match=r"moe_backend: megablocks computes the experts in bf16 only.*float32 on cuda.*amp_bf16",
    ):
        mb(torch.randn(8, D, device="cuda"))


def test_auto_picks_megablocks_and_falls_back_where_its_kernels_cannot_run():
    """moe_backend auto on CUDA with the [gpu] extra: the megablocks kernels for bf16 on CUDA, the torch
    backend's code on the same parameters for anything else (fp32 generation, a model still on CPU)."""
    torch.manual_seed(0)
    cfg = DbrxFFNConfig(ffn_hidden_size=FF, moe_num_experts=16, moe_top_k=4)
    ffns = {b: DbrxFFN(D, cfg, resolve_moe_backend(b)) for b in ("torch", "megablocks", "auto")}
    for p in ffns["torch"].parameters():  # ExpertGLU's are torch.empty until the model's init_weights
        torch.nn.init.normal_(p, std=0.05)
    for ffn in ffns.values():
        ffn.load_state_dict(ffns["torch"].state_dict())
    auto = ffns["auto"]
    assert (
        type(auto.experts) is MegaBlocksExperts
        and auto.experts.backend.torch_fallback
        and not ffns["megablocks"].experts.backend.torch_fallback
    )
    x = torch.randn(256, D)
    torch.testing.assert_close(auto(x).out_ND, ffns["torch"](x).out_ND, rtol=0, atol=0)  # on CPU: torch code
    for ffn in ffns.values():
        ffn.cuda()
    x = x.cuda()
    # fp32 on CUDA: the torch code (to fp32 rounding: its index_add sums rows in atomic order on CUDA)
    torch.testing.assert_close(auto(x).out_ND, ffns["torch"](x).out_ND, rtol=1e-5, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, strict = auto(x).out_ND, ffns["megablocks"](x).out_ND
    torch.testing.assert_close(got, strict, rtol=0, atol=0)  # bf16 on CUDA: the megablocks kernels


def test_a_torch_backend_checkpoint_runs_on_megablocks():
    """Whole model: the torch backend's state_dict loads into the megablocks model, which gives the
    same loss, and gradients as close to the torch backend's fp32 gradients as its own bf16 ones are.

    The two bf16 backends differ by up to 8% on layer 1's MoE gradients (seen on an H200): tiny
    differences upstream flip near-tied routing choices. Each is 5-12% from fp32 there, megablocks
    within 1.3x of torch on every parameter (scripts/gpu/grad_error_vs_fp32.py prints the table)."""
    cfg = {
        "d_model": D,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 128,
        "vocab_size": 1024,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": FF, "moe_num_experts": 16, "moe_top_k": 4},
    }
    models = {}
    for backend in ("torch", "megablocks"):
        torch.manual_seed(0)
        cfg["ffn_config"]["moe_backend"] = backend
        models[backend] = DbrxForCausalLM(build(DbrxConfig, cfg)).cuda().train()
    state = models["torch"].state_dict()
    shapes = {k: v.shape for k, v in models["megablocks"].state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == shapes
    models["megablocks"].load_state_dict(state)
    ids = torch.randint(
        0, 1024, (4, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)
    )

    def loss_and_grads(model, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()}

    loss_fp32, exact = loss_and_grads(models["torch"], bf16=False)
    loss_torch, g_torch = loss_and_grads(models["torch"], bf16=True)
    loss_mb, g_mb = loss_and_grads(models["megablocks"], bf16=True)
    assert abs(loss_mb - loss_fp32) < 1e-3 * loss_fp32, (loss_fp32, loss_torch, loss_mb)
    assert g_mb.keys() == exact.keys()
    for name, g in exact.items():
        err_torch = ((g_torch[name] - g).norm() / g.norm()).item()
        err_mb = ((g_mb[name] - g).norm() / g.norm()).item()
        assert err_mb < 2 * err_torch + 1e-3, (
            f"gradient of {name}: {err_mb:.2e} from fp32, torch {err_torch:.2e}"
        )
