"""MoE steps and the torch backend against a dense loop over experts written here."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dbrx_train.model import DbrxFFNConfig
from dbrx_train.model import moe as moe_lib
from dbrx_train.model.moe import DbrxFFN, combine, gather, load_balancing_loss, route, sort_by_expert

D, FF = 16, 24


def make_ffn(num_experts=16, top_k=2, normalize=1.0, seed=0, moe_backend="torch", **kwargs):
    torch.manual_seed(seed)
    cfg = DbrxFFNConfig(
        ffn_hidden_size=FF,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_normalize_expert_weights=normalize,
        **kwargs,
    )
    ffn = DbrxFFN(D, cfg, moe_lib.resolve_moe_backend(moe_backend))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ffn


def reference_moe(ffn, x_ND):
    """Every token through each of its top-k experts, one token and one expert at a time."""
    E, k, p = ffn.router.layer.weight.shape[0], ffn.router.top_k, ffn.router.normalize_p
    probs = torch.softmax(x_ND @ ffn.router.layer.weight.t(), dim=-1)
    top_w, top_e = torch.topk(probs, k, dim=-1)
    if p is not None:
        top_w = top_w / (top_w.abs() ** p).sum(dim=-1, keepdim=True) ** (1.0 / p)
    mlp = ffn.experts.mlp
    w1, v1, w2 = (w.view(E, FF, D) for w in (mlp.w1, mlp.v1, mlp.w2))
    rows = []
    for n in range(x_ND.shape[0]):
        row = torch.zeros(D)
        for j in range(k):
            e = top_e[n, j]
            glu = F.silu(w1[e] @ x_ND[n]) * (v1[e] @ x_ND[n])
            row = row + top_w[n, j] * (glu @ w2[e])
        rows.append(row)
    return torch.stack(rows)


def assert_matches_reference(ffn, x_ND):
    params = [ffn.router.layer.weight, ffn.experts.mlp.w1, ffn.experts.mlp.v1, ffn.experts.mlp.w2]
    x_ref = x_ND.clone().requires_grad_(True)
    x_fast = x_ND.clone().requires_grad_(True)
    expected = reference_moe(ffn, x_ref)
    got = ffn(x_fast).out_ND
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(got)
    expected_grads = torch.autograd.grad(expected, [x_ref, *params], grad_out)
    got_grads = torch.autograd.grad(got, [x_fast, *params], grad_out)
    for name, g, e in zip(["x", "router", "w1", "v1", "w2"], got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("normalize", [1.0, 2.0, None])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_torch_moe_matches_dense_loop(top_k, normalize):
    ffn = make_ffn(num_experts=16, top_k=top_k, normalize=normalize)
    x = torch.randn(40, D)
    assert_matches_reference(ffn, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the torch backend on a CUDA device")
def test_torch_backend_on_cuda_matches_the_cpu():
    """The torch backend is the GPU fallback too: same result on CUDA (fp32, TF32 off) as on the CPU."""
    ffn = make_ffn(num_experts=16, top_k=4)
    x = torch.randn(64, D)
    expected = ffn(x).out_ND
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = ffn.cuda()(x.cuda()).out_ND.cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_expert_moe_is_a_dense_glu():
    ffn = make_ffn(num_experts=1, top_k=1)
    x = torch.randn(10, D)
    mlp = ffn.experts.mlp
    dense = (F.silu(x @ mlp.w1.t()) * (x @ mlp.v1.t())) @ mlp.w2
    torch.testing.assert_close(ffn(x).out_ND, dense, atol=1e-6, rtol=1e-6)


def test_dropless_when_every_token_picks_the_same_experts():
    ffn = make_ffn(num_experts=8, top_k=2)
    with torch.no_grad():  # x > 0, so expert 3 always wins and expert 5 is always second
        ffn.router.layer.weight.fill_(-1.0)
        ffn.router.layer.weight[3] = 2.0
        ffn.router.layer.weight[5] = 1.0
    x = torch.rand(32, D) + 0.1
    routing = ffn.router(x)
    assert sort_by_expert(routing.experts_Nk, 8).tokens_per_expert_E.tolist() == [0, 0, 0, 32, 0, 32, 0, 0]
    assert_matches_reference(ffn, x)


def test_sort_gather_combine_on_a_hand_worked_layout():
    experts_Nk = torch.tensor([[2, 0], [1, 2], [2, 3]])  # 3 tokens, k=2, E=5; expert 4 unused
    bins = sort_by_expert(experts_Nk, num_experts=5)
    # flat assignments: 0->e2 1->e0 2->e1 3->e2 4->e2 5->e3; stable sort by expert:
    assert bins.order_M.tolist() == [1, 2, 0, 3, 4, 5]
    assert bins.tokens_per_expert_E.tolist() == [1, 1, 3, 1, 0]
    assert bins.offsets_E1.tolist() == [0, 1, 2, 5, 6, 6]

    x_ND = torch.tensor([[1.0], [10.0], [100.0]])
    x_MD = gather(x_ND, bins.order_M, top_k=2)
    assert x_MD[:, 0].tolist() == [1.0, 10.0, 1.0, 10.0, 100.0, 100.0]  # tokens 0 1 0 1 2 2

    weights_Nk = torch.tensor([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0]])
    y_MD = x_MD * 2  # a stand-in expert
    out = combine(y_MD, bins, weights_Nk, num_tokens=3)
    assert out[:, 0].tolist() == [2 * 1 * (0.5 + 0.25), 2 * 10 * (0.75 + 0.125), 2 * 100 * (1.0 + 2.0)]


def test_expert_compute_is_one_matmul_per_weight_per_used_expert():
    ffn = make_ffn(num_experts=16, top_k=2)
    N = 24
    x = torch.randn(N, D)
    with FlopCounterMode(display=False) as counter:
        ffn(x)
    # Router (N x D x E) plus exactly the N*k assigned rows through 3 weights of F x D each: no
    # masked passes over all tokens, no dropped tokens.
    expected = 2 * N * D * 16 + 3 * 2 * (N * 2) * D * FF
    assert counter.get_total_flops() == expected


def test_route_normalisation_and_order():
    torch.manual_seed(0)
    x, w = torch.randn(8, D), torch.randn(6, D)
    probs = torch.softmax(x @ w.t(), dim=-1)
    r = route(x, w, top_k=3, normalize_p=None)
    torch.testing.assert_close(r.probs_NE, probs)
    torch.testing.assert_close(r.weights_Nk, probs.gather(1, r.experts_Nk))
    assert (r.weights_Nk[:, :-1] >= r.weights_Nk[:, 1:]).all()
    assert r.weights_Nk.dtype == torch.float32
    torch.testing.assert_close(route(x, w, top_k=3, normalize_p=1.0).weights_Nk.sum(-1), torch.ones(8))
    torch.testing.assert_close(route(x, w, top_k=3, normalize_p=2.0).weights_Nk.norm(dim=-1), torch.ones(8))


def test_router_probabilities_are_fp32_for_bf16_inputs():
    x, w = torch.randn(8, D, dtype=torch.bfloat16), torch.randn(6, D, dtype=torch.bfloat16)
    r = route(x, w, top_k=2, normalize_p=1.0)
    assert r.probs_NE.dtype == torch.float32 and r.logits_NE.dtype == torch.bfloat16


def test_jitter_perturbs_router_input_only_in_training():
    eps = 0.2
    ffn = make_ffn(num_experts=8, top_k=2, moe_jitter_eps=eps)
    x = torch.randn(16, D)
    ffn.eval()
    torch.testing.assert_close(ffn.router(x).logits_NE, x @ ffn.router.layer.weight.t())
    torch.testing.assert_close(ffn(x).out_ND, reference_moe(ffn, x), atol=1e-5, rtol=1e-5)

    ffn.train()
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.manual_seed(123)
    jittered = ffn.router(x)
    torch.testing.assert_close(jittered.logits_NE, (x * noise) @ ffn.router.layer.weight.t())
    assert not torch.allclose(jittered.logits_NE, x @ ffn.router.layer.weight.t())


def test_uniform_expert_assignment_is_round_robin():
    ffn = make_ffn(num_experts=4, top_k=2, uniform_expert_assignment=True)
    x = torch.randn(6, D)
    r = ffn.router(x)
    assert r.experts_Nk.tolist() == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]]
    assert sort_by_expert(r.experts_Nk, 4).tokens_per_expert_E.tolist() == [3, 3, 3, 3]
    out = ffn(x).out_ND
    mlp = ffn.experts.mlp
    w1, v1, w2 = (w.view(4, FF, D) for w in (mlp.w1, mlp.v1, mlp.w2))
    n, e, j = 1, 3, 1  # token 1's second assignment is expert 3
    part = r.weights_Nk[n, 0] * ((F.silu(w1[2] @ x[n]) * (v1[2] @ x[n])) @ w2[2])
    part = part + r.weights_Nk[n, j] * ((F.silu(w1[e] @ x[n]) * (v1[e] @ x[n])) @ w2[e])
    torch.testing.assert_close(out[n], part, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # Balanced assignment: f = [1/2, 1/2], P = [0.55, 0.45] -> 2 * (0.275 + 0.225) = 1.0
    assert load_balancing_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)
    # Everything on expert 0: f = [1, 0] -> 2 * 0.55
    assert load_balancing_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.1)

    # k=2 of E=3: assignments e0, e1, e0, e2 -> f = [2/4, 1/4, 1/4]; P = [0.35, 0.35, 0.3]
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.4, 0.4]], requires_grad=True)
    loss = load_balancing_loss(probs3, torch.tensor([[0, 1], [0, 2]]))
    assert loss.item() == pytest.approx(3 * (0.5 * 0.35 + 0.25 * 0.35 + 0.25 * 0.3))
    loss.backward()  # d loss / d p_ne = E * f_e / N; f carries no gradient
    torch.testing.assert_close(probs3.grad, torch.tensor([[0.75, 0.375, 0.375]] * 2))


def test_ffn_returns_its_layers_aux_loss_and_router_logits():
    ffn = make_ffn(num_experts=8, top_k=2)
    x = torch.randn(20, D)
    out = ffn(x)
    routing = ffn.router(x)
    assert out.aux_loss.shape == ()
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(routing.probs_NE, routing.experts_Nk))
    torch.testing.assert_close(out.router_logits_NE, routing.logits_NE)
    out.aux_loss.backward()
    assert ffn.router.layer.weight.grad.abs().sum() > 0


def test_backend_resolution():
    """`moe_backend` is read once, into an object every layer builds its experts with."""
    assert type(moe_lib.resolve_moe_backend("torch")) is moe_lib.TorchBackend
    assert type(moe_lib.resolve_moe_backend("auto", "cpu")) is moe_lib.TorchBackend
    # "auto": megablocks on CUDA with the [gpu] extra importable, the torch backend everywhere else.
    usable = torch.cuda.is_available() and moe_lib.megablocks_import_error() is None
    auto = moe_lib.resolve_moe_backend("auto")
    assert type(auto) is (moe_lib.MegaBlocksBackend if usable else moe_lib.TorchBackend)
    assert auto.torch_fallback  # auto never refuses a call: the torch code takes what the kernels cannot
    expected = moe_lib.MegaBlocksExperts if usable else moe_lib.TorchExperts
    assert type(make_ffn(moe_backend="auto").experts) is expected
    # By name, for a GPU run: chosen without importing MegaBlocks (a config is checked on any machine).
    named = moe_lib.resolve_moe_backend("megablocks", "cuda")
    assert type(named) is moe_lib.MegaBlocksBackend and not named.torch_fallback
    assert "kernels" not in vars(named)
    assert named.unsupported("cuda", torch.bfloat16) is None
    assert "bf16 only" in named.unsupported("cuda", torch.float32)
    assert "CUDA kernels" in named.unsupported("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match=r"moe_backend must be one of auto\|torch\|megablocks; got 'cuda'"):
        moe_lib.resolve_moe_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_megablocks_backend_without_cuda_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"moe_backend: megablocks runs CUDA kernels, but the model is on cpu; use torch \(or auto\)",
    ):
        make_ffn(moe_backend="megablocks")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("megablocks") is not None,
    reason="checks the error on CUDA machines without the [gpu] extra",
)
def test_megablocks_backend_not_installed_is_a_clear_error():
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \.\[gpu\]"):
        make_ffn(moe_backend="megablocks")


# ---------------------------------------------------------------------------------------------
# The torch backend's fused gather -> expert_glu -> combine against the steps it fuses
# ---------------------------------------------------------------------------------------------
def unfused_experts(x_ND, weights_Nk, bins, tokens_per_expert, w1, v1, w2, act):
    x_MD = gather(x_ND, bins.order_M, weights_Nk.shape[-1])
    return combine(
        moe_lib.expert_glu(x_MD, tokens_per_expert, w1, v1, w2, act), bins, weights_Nk, x_ND.shape[0]
    )


def fused_inputs(N, E, k, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=dtype)
    weights = torch.rand(N, k, generator=gen)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    w1, v1, w2 = (0.3 * torch.randn(E, FF, D, generator=gen) for _ in range(3))
    return x, weights, experts, w1, v1, w2


@pytest.mark.parametrize("act", [F.silu, F.gelu, F.relu, torch.tanh])  # tanh: the fallback path
@pytest.mark.parametrize("N", [3, 40])  # 3 tokens x top-2 of 16 experts leaves most experts empty
def test_fused_experts_match_the_steps(act, N):
    x, weights, experts, w1, v1, w2 = fused_inputs(N, E=16, k=2)
    bins = sort_by_expert(experts, 16)
    counts = bins.tokens_per_expert_E.tolist()
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w1, v1, w2)]
    fused_leaves = [t.clone().requires_grad_(True) for t in (x, weights, w1, v1, w2)]
    expected = unfused_experts(leaves[0], leaves[1], bins, counts, *leaves[2:], act)
    got = moe_lib.fused_experts(fused_leaves[0], fused_leaves[1], bins, counts, *fused_leaves[2:], act)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(got)
    for name, g, e in zip(
        ["x", "weights", "w1", "v1", "w2"],
        torch.autograd.grad(got, fused_leaves, grad_out),
        torch.autograd.grad(expected, leaves, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_fused_experts_under_bf16_autocast_match_the_steps():
    x, weights, experts, w1, v1, w2 = fused_inputs(40, E=8, k=2)
    bins = sort_by_expert(experts, 8)
    counts = bins.tokens_per_expert_E.tolist()
    results = []
    for fn in (unfused_experts, moe_lib.fused_experts):
        leaves = [t.clone().requires_grad_(True) for t in (x, weights, w1, v1, w2)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(leaves[0], leaves[1], bins, counts, *leaves[2:], F.silu)
        out.float().pow(2).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    (expected, expected_grads), (got, got_grads) = results
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == e.dtype == torch.float32
        # bf16 rounds at different points in the two backward passes: compare whole tensors.
        assert (g - e).norm() <= 2e-2 * e.norm()


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs, counted once per storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_fused_experts_keep_less_for_backward_than_the_steps():
    x, weights, experts, w1, v1, w2 = fused_inputs(64, E=4, k=2)
    bins = sort_by_expert(experts, 4)
    counts = bins.tokens_per_expert_E.tolist()
    leaves = [t.requires_grad_(True) for t in (x, weights, w1, v1, w2)]
    inputs = sum(t.untyped_storage().nbytes() for t in leaves)
    M = 64 * 2
    fused = saved_bytes(
        lambda: moe_lib.fused_experts(leaves[0], leaves[1], bins, counts, *leaves[2:], F.silu)
    )
    steps = saved_bytes(lambda: unfused_experts(leaves[0], leaves[1], bins, counts, *leaves[2:], F.silu))
    # fused: h1, h2 (M, F) + the routing order and weights; the steps add x_MD, y_MD, act(h1), glu.
    assert fused - inputs <= 4 * (2 * M * FF + 3 * M)
    assert steps - inputs >= 4 * (4 * M * FF + 2 * M * D)
