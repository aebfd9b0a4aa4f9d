"""Check the megablocks backend's use of MegaBlocks on a machine without a GPU (a development check).

MegaBlocks cannot be installed without CUDA, so the real tests (tests/model/test_moe_megablocks.py)
only run on a GPU. This check runs the backend through MegaBlocks' real Python code and its real
Triton gather/scatter kernels (Triton's interpreter, TRITON_INTERPRET=1, on CPU tensors); only the
compiled parts are replaced, by the plain definitions of what they compute:
- megablocks_ops.sort / histogram / inclusive_cumsum (cub radix sort and scans): torch.sort (stable),
  bincount, cumsum;
- grouped_gemm_backend.gmm (CUTLASS/cuBLAS): one bf16 matmul per expert, fp32 accumulation, as in
  grouped_gemm's own reference test.
It compares (a) the megablocks backend with the torch backend, outputs and gradients in bf16, and
(b) the backend's experts with MegaBlocks' own ParallelDroplessMLP (`mlp_impl='grouped'`, GLU) on the
same weights and routing, which must agree exactly. It proves the wiring (argument order, weight
layout, where the routing weight is applied), not the CUDA kernels or their speed: that is the GPU
tests' job.

Usage: python scripts/gpu/check_megablocks_on_cpu.py [.whl]   (the sdists of fetch_sources.py)
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
import types
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def unpack_sources(folder: Path, into: Path) -> None:
    for name in ("stanford_stk-0.7.1", "grouped_gemm-0.3.0", "megablocks-0.10.0"):
        archive = folder / f"{name}.tar.gz"
        if not archive.exists():
            raise SystemExit(f"{archive} is missing: run scripts/gpu/fetch_sources.py {folder} first")
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
        sys.path.insert(0, str(into / name))


def install_cpu_stand_ins() -> None:
    ops = types.ModuleType("megablocks_ops")

    def sort(x, end_bit, x_out, iota_out):
        values, order = torch.sort(x, stable=True)
        x_out.copy_(values)
        iota_out.copy_(order.to(iota_out.dtype))

    ops.sort = sort
    ops.histogram = lambda x, num_bins: torch.bincount(x.long(), minlength=num_bins).to(torch.int32)
    ops.inclusive_cumsum = lambda x, dim, out: out.copy_(torch.cumsum(x, dim))
    ops.exclusive_cumsum = lambda x, dim, out: out.copy_(torch.cumsum(x, dim) - x)
    sys.modules["megablocks_ops"] = ops

    gg = types.ModuleType("grouped_gemm_backend")

    def gmm(a, b, c, batch_sizes, trans_a, trans_b):
        assert a.dtype == b.dtype == c.dtype == torch.bfloat16, (a.dtype, b.dtype, c.dtype)
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        start = 0
        for i, size in enumerate(batch_sizes.tolist()):
            rows = slice(start, start + size)
            if trans_a:  # weight gradients: c[i] = a[rows].T @ b[rows]
                c[i] = (a[rows].float().t() @ b[rows].float()).to(c.dtype)
            else:
                b_i = b[i].float().t() if trans_b else b[i].float()
                c[rows] = (a[rows].float() @ b_i).to(c.dtype)
            start += size

    gg.gmm = gmm
    sys.modules["grouped_gemm_backend"] = gg

    import triton

    class FirstConfig:  # the interpreter has no benchmarker for triton.autotune: take its first config
        def __init__(self, fn, config):
            self.fn, self.config = fn, config

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.config.kwargs)

    triton.autotune = lambda configs, key, **kwargs: lambda fn: FirstConfig(fn, configs[0])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        unpack_sources(Path(sys.argv[1] if len(sys.argv) > 1 else ".whl"), Path(tmp))
        install_cpu_stand_ins()
        check()


def check() -> None:
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    from dbrx_train.model import DbrxFFNConfig
    from dbrx_train.model import moe as moe_lib

    # CPU stand-in for the backend's CUDA check: its forward tests device and dtype before calling
    # the kernels' path, which is what runs here (in bf16, as under autocast on a GPU). The backends
    # are resolved for "cuda", the device the kernels are written for.
    moe_lib.MegaBlocksExperts.forward = lambda self, x, routing: self.megablocks_forward(
        x, routing, torch.bfloat16
    )

    D, FF = 64, 96
    for E, K, N, act in ((8, 2, 50, "silu"), (8, 2, 50, "gelu"), (16, 4, 3, "silu"), (1, 1, 7, "silu")):
        ffns = []
        for backend in ("torch", "megablocks"):
            torch.manual_seed(0)
            cfg = DbrxFFNConfig(
                ffn_hidden_size=FF,
                moe_num_experts=E,
                moe_top_k=K,
                ffn_act_fn={"name": act},
            )
            ffns.append(moe_lib.DbrxFFN(D, cfg, moe_lib.resolve_moe_backend(backend, "cuda")))
        ref, mb = ffns
        assert isinstance(mb.experts, moe_lib.MegaBlocksExperts)
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.1)
        mb.load_state_dict(ref.state_dict())
        x = torch.randn(N, D)
        results = []
        for ffn in (ref, mb):
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = ffn(xx).out_ND
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            out.backward(grad)
            results.append([out.float(), xx.grad] + [p.grad.float() for p in ffn.parameters()])
        names = ["output", "x grad", "router grad", "w1 grad", "v1 grad", "w2 grad"]
        errors = []
        for name, a, b in zip(names, results[1], results[0], strict=True):
            # (one expert: router gradient 0 in both, as the softmax over one expert is constant)
            rel = ((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item()
            errors.append(f"{name} {rel:.1e}")
            assert rel < 1e-2, f"E={E} k={K} N={N} {act}: {name} normwise relative error {rel:.2e}"

        if E * FF < 128:  # ParallelDroplessMLP's own setup takes log2(E * F // 128)
            print(f"E={E:2d} k={K} N={N:2d} {act}: vs torch backend (normwise) {', '.join(errors)}")
            continue
        args = Arguments(
            hidden_size=D,
            ffn_hidden_size=FF,
            moe_num_experts=E,
            moe_top_k=K,
            mlp_type="glu",
            mlp_impl="grouped",
            bf16=True,
            fp16=False,  # Arguments defaults to fp16=True, which wins over bf16
            activation_fn={"silu": F.silu, "gelu": F.gelu}[act],
            bias=False,
            moe_loss_weight=0.0,
            device="cpu",
        )
        theirs = ParallelDroplessMLP(args)
        with torch.no_grad():
            for w in ("w1", "v1", "w2"):
                getattr(theirs.mlp, w).copy_(getattr(mb.experts.mlp, w))
            routing = mb.router(x)
            expected = theirs(
                x.bfloat16(), routing.probs_NE, routing.weights_Nk.bfloat16(), routing.experts_Nk
            )
            got = mb.experts(x.bfloat16(), routing)
        diff = (got.float() - expected.float()).abs().max().item()
        assert diff == 0.0, f"E={E} k={K} N={N} {act}: differs from ParallelDroplessMLP by {diff}"
        print(
            f"E={E:2d} k={K} N={N:2d} {act}: vs torch backend (normwise) {', '.join(errors)}; "
            "vs MegaBlocks' ParallelDroplessMLP: identical"
        )
    check_whole_model()
    print("OK")


def check_whole_model() -> None:
    """The backend inside the model: a torch-backend state_dict loads, loss and gradients agree."""
    from dbrx_train.config.schema import build
    from dbrx_train.model import DbrxConfig, DbrxForCausalLM
    from dbrx_train.model.moe import resolve_moe_backend

    cfg = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 32,
        "vocab_size": 512,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 16, "moe_top_k": 4},
    }
    models = {}
    for backend in ("torch", "megablocks"):
        torch.manual_seed(0)
        models[backend] = DbrxForCausalLM(
            build(DbrxConfig, cfg), resolve_moe_backend(backend, "cuda")
        ).train()
    models["megablocks"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for backend, model in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses[backend] = loss.item()
    assert abs(losses["megablocks"] - losses["torch"]) < 1e-2 * losses["torch"], losses
    worst = 0.0
    pairs = zip(models["torch"].named_parameters(), models["megablocks"].parameters(), strict=True)
    for (name, p_ref), p_mb in pairs:
        rel = ((p_mb.grad - p_ref.grad).norm() / p_ref.grad.norm()).item()
        assert rel < 2e-2, f"whole model: gradient of {name}: normwise relative error {rel:.2e}"
        worst = max(worst, rel)
    print(
        f"whole model (2 layers, E16 top-4, bf16 autocast): loss {losses['megablocks']:.5f} vs torch backend "
        f"{losses['torch']:.5f}; worst gradient (normwise) {worst:.1e}"
    )


if __name__ == "__main__":
    main()
