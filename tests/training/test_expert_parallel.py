"""Expert parallelism's token exchange on 2 gloo ranks against the same FFN computed whole on each rank."""

import datetime
import faulthandler
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dbrx_train.model import DbrxFFNConfig
from dbrx_train.model.moe import DbrxFFN, TorchBackend

D, FF = 32, 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, num_experts: int, top_k: int, num_tokens: list[int], errors: str
):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dbrx_train.training.expert_parallel import ExpertParallelExperts, apply_expert_parallel

    # A stuck rank prints every thread's stack and exits 1 instead of hanging the test.
    faulthandler.dump_traceback_later(120, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a rank that fails mid-collective must not leave the other waiting for 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same weights on every rank
        cfg = DbrxFFNConfig(ffn_hidden_size=FF, moe_num_experts=num_experts, moe_top_k=top_k)
        ref = DbrxFFN(D, cfg, TorchBackend())
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.2)
        ep_ffn = DbrxFFN(D, cfg, TorchBackend())
        ep_ffn.load_state_dict(ref.state_dict())
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        holder = torch.nn.Module()
        holder.ffn = ep_ffn
        assert len(apply_expert_parallel(holder, mesh, grad_scale=1.0 / world)) == 1
        assert isinstance(ep_ffn.experts, ExpertParallelExperts)

        # Different tokens (and counts: some ranks may send nothing to some experts) per rank.
        x = torch.randn(num_tokens[rank], D, generator=torch.Generator().manual_seed(100 + rank))
        grad_out = torch.randn(num_tokens[rank], D, generator=torch.Generator().manual_seed(200 + rank))

        def run(ffn):
            x_in = x.clone().requires_grad_(True)
            out = ffn(x_in)
            loss = (out.out_ND * grad_out).sum()
            if num_tokens[rank]:  # the load-balancing loss of no tokens is NaN, with or without EP
                loss = loss + out.aux_loss
            loss.backward()
            return out, x_in

        out_ref, x_ref = run(ref)
        out_ep, x_ep = run(ep_ffn)
        torch.testing.assert_close(out_ep.out_ND, out_ref.out_ND)
        torch.testing.assert_close(out_ep.aux_loss, out_ref.aux_loss, equal_nan=True)
        torch.testing.assert_close(x_ep.grad, x_ref.grad)  # the rows' way back through both exchanges
        torch.testing.assert_close(ep_ffn.router.layer.weight.grad, ref.router.layer.weight.grad)
        # Expert weights: the owner's gradient is the mean over ranks of every rank's whole-FFN gradient.
        rows = num_experts // world * FF
        for name in ("w1", "v1", "w2"):
            full = getattr(ref.experts.mlp, name).grad.clone()
            dist.all_reduce(full)
            expected = (full / world)[rank * rows : (rank + 1) * rows]
            got = getattr(ep_ffn.experts.mlp, name).grad
            assert got.to_local().shape == expected.shape
            torch.testing.assert_close(got.to_local(), expected)
            torch.testing.assert_close(got.full_tensor(), full / world)
    except (
        BaseException
    ) as error:  # a file per rank (a Queue can block a child's exit): the parent reports them
        Path(errors, f"rank{rank}.txt").write_text(f"rank {rank}: {type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()
        # Seen here: a spawned gloo rank that returned from this function could hang in interpreter
        # teardown (1 run in ~4). The results are already in `errors`; skip the teardown.
        sys.stderr.flush()
        os._exit(0)


@pytest.mark.parametrize(
    "num_experts,top_k,num_tokens",
    [(4, 2, [37, 19]), (8, 4, [64, 64]), (4, 1, [3, 0])],  # [3, 0]: one rank has no tokens at all
)
def test_expert_parallel_ffn_equals_the_whole_ffn(num_experts, top_k, num_tokens, tmp_path):
    mp.start_processes(
        _worker,
        args=(2, free_port(), num_experts, top_k, num_tokens, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    found = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Real 2-rank Composer runs: EP against plain FSDP, resume, and elastic resume both ways
# ---------------------------------------------------------------------------------------------
EP_RUN = [
    "run_name=ep",
    "max_duration=4ba",
    "save_interval=2ba",
    "save_num_checkpoints_to_keep=-1",
    "eval_interval=100ba",
    "curriculum=null",
    "callbacks.sample_log={}",
    "callbacks.expert_load=null",
    # Norm clipping always engaged, so equal AdamW moments also show the clip coefficient computed
    # over both meshes (clip_grad_norm_sharded_) equals torch's over one.
    "algorithms.gradient_clipping.clipping_threshold=0.001",
    # fp32 HF folders at batches 2 and 4: full weights, gathered from every shard
    "callbacks.hf_export={dtype: fp32, tokenizer: false, save_interval: 2ba}",
]
EP2 = "fsdp_config.expert_parallel_degree=2"


def train_losses(run_dir) -> dict[int, float]:
    from tests.training.test_train_e2e import read_metrics

    return {r["batch"]: r["loss/train/total"] for r in read_metrics(run_dir) if "loss/train/total" in r}


def exported(run_dir, batch: int = 4) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "hf" / f"ba{batch}" / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal up to fp rounding, which AdamW magnifies where gradients are near zero (a few elements
    can move by ~lr), hence normwise: seen <= 1e-4; one expert's rows in another's place give ~1.4."""
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        rel = ((got[key] - want[key]).norm() / want[key].norm()).item()
        assert rel < 1e-3, f"{key}: normwise relative difference {rel:.1e}"


def saved_adam_moments(checkpoint) -> dict[str, torch.Tensor]:
    """Every AdamW first moment in a Composer (DCP) checkpoint, read whole: it is proportional to the
    gradient, so it shows a gradient scale that AdamW's own updates would hide."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata().state_dict_metadata
    moments = {key: torch.empty(meta.size) for key, meta in metadata.items() if key.endswith(".exp_avg")}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(moments, storage_reader=reader)
    assert any("experts.mlp.w1" in key for key in moments)
    return moments


def assert_same_gradients(got_checkpoint, want_checkpoint) -> None:
    got, want = saved_adam_moments(got_checkpoint), saved_adam_moments(want_checkpoint)
    assert got.keys() == want.keys()
    for key in want:
        rel = ((got[key] - want[key]).norm() / want[key].norm()).item()
        assert rel < 1e-4, f"{key}: normwise relative difference {rel:.1e}"


@pytest.fixture(scope="module")
def ep_runs(default_corpus, tmp_path_factory):
    """4-batch 2-rank runs, checkpoints at 2 and 4: plain FSDP and FSDP + expert parallelism 2."""
    from tests.training.test_train_e2e import launch

    root = tmp_path_factory.mktemp("ep")
    launch(2, root / "fsdp", default_corpus, *EP_RUN)
    ep = launch(2, root / "ep", default_corpus, *EP_RUN, EP2)
    return root, ep.stdout + ep.stderr


@pytest.mark.slow
def test_expert_parallel_training_equals_plain_fsdp(ep_runs):
    root, output = ep_runs
    assert "expert parallelism: 2 MoE layers, 8 experts per rank" in output
    want = train_losses(root / "fsdp")
    got = train_losses(root / "ep")
    assert sorted(got) == [1, 2, 3, 4]
    for batch in want:  # gradient clipping (norm) included: it totals norms over both meshes
        assert got[batch] == pytest.approx(want[batch], rel=1e-6), batch
    # The HF export gathers every expert from its owner: the same weights as without EP.
    assert_same_weights(exported(root / "ep"), exported(root / "fsdp"))
    # The same gradients too (the mean over ranks), which the losses alone cannot show under AdamW.
    assert_same_gradients(root / "ep" / "ep0-ba2", root / "fsdp" / "ep0-ba2")


@pytest.mark.slow
def test_expert_parallel_resumes_exactly(ep_runs, default_corpus, tmp_path):
    from tests.training.test_train_e2e import launch

    root, _ = ep_runs
    # With activation checkpointing: each block's forward, token exchanges included, runs again in
    # backward; the numbers do not change.
    resume = [f"load_path={root / 'ep' / 'ep0-ba2'}", "fsdp_config.activation_checkpointing=true"]
    launch(2, tmp_path / "resumed", default_corpus, *EP_RUN, EP2, *resume)
    got, want = train_losses(tmp_path / "resumed"), train_losses(root / "ep")
    assert got == {3: want[3], 4: want[4]}  # bit for bit
    assert_same_weights(exported(tmp_path / "resumed"), exported(root / "ep"))


@pytest.mark.slow
def test_an_expert_parallel_checkpoint_loads_exactly_on_one_rank(ep_runs, default_corpus, tmp_path):
    """The experts' checkpoint holds global (E*F, D) tensors: one rank without EP loads the same
    numbers (max_duration reached at once: the run only loads and writes its HF export)."""
    from tests.training.test_train_e2e import launch

    root, _ = ep_runs
    launch(
        1,
        tmp_path / "one",
        default_corpus,
        *EP_RUN,
        "max_duration=2ba",
        f"load_path={root / 'ep' / 'ep0-ba2'}",
    )
    got, want = exported(tmp_path / "one", 2), exported(root / "ep", 2)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
# CI time (pyproject: extended): test_expert_parallel_resumes_exactly and the 1-rank load of an EP checkpoint run
# in make test
@pytest.mark.extended
def test_a_plain_fsdp_checkpoint_resumes_with_expert_parallelism(ep_runs, default_corpus, tmp_path):
    """Weights and AdamW state saved without EP reshard onto the experts' mesh: training goes on as
    if nothing had changed."""
    from tests.training.test_train_e2e import launch

    root, _ = ep_runs
    launch(2, tmp_path / "resumed", default_corpus, *EP_RUN, EP2, f"load_path={root / 'fsdp' / 'ep0-ba2'}")
    got, want = train_losses(tmp_path / "resumed"), train_losses(root / "fsdp")
    assert sorted(got) == [3, 4]
    for batch in (3, 4):
        assert got[batch] == pytest.approx(want[batch], rel=1e-6), batch
    assert_same_weights(exported(tmp_path / "resumed"), exported(root / "fsdp"))


@pytest.mark.extended  # CI time (pyproject: extended); the 2-rank EP tests run in make test
@pytest.mark.slow
def test_expert_parallel_on_four_ranks_shards_each_expert_over_two(default_corpus, tmp_path):
    """ep 2 of 4 ranks: each expert lives on 2 ranks (FSDP over "expert_dp"), which average its
    gradient; the run equals plain FSDP on 4 ranks."""
    from tests.training.test_train_e2e import launch

    four = [*EP_RUN, "max_duration=2ba", "device_train_microbatch_size=2", "callbacks.hf_export=null"]
    launch(4, tmp_path / "fsdp", default_corpus, *four)
    launch(4, tmp_path / "ep", default_corpus, *four, EP2)
    got, want = train_losses(tmp_path / "ep"), train_losses(tmp_path / "fsdp")
    assert sorted(got) == [1, 2]
    for batch in want:
        assert got[batch] == pytest.approx(want[batch], rel=1e-6), batch
    assert_same_gradients(tmp_path / "ep" / "ep0-ba2", tmp_path / "fsdp" / "ep0-ba2")
