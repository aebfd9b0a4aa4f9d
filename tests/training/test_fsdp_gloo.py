"""FSDP2 on gloo averages gradients over ranks, as on NCCL (torch 2.7's gloo path summed them)."""

import datetime
import faulthandler
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.training.test_expert_parallel import free_port


def _worker(rank: int, port: int, shape: tuple[int, ...], errors: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dbrx_train.training.parallelize import average_gradients_on_gloo

    faulthandler.dump_traceback_later(120, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        average_gradients_on_gloo()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 4))
        reference = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 4))
        reference.load_state_dict(model.state_dict())
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))  # different data per rank
        reference(x).square().sum().backward()
        names = ("HSDP" if len(shape) == 2 else "FSDP", "replicate", "shard")
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names[1:] if len(shape) == 2 else None)
        fully_shard(model, mesh=mesh)
        model(x).square().sum().backward()
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            mean = p_ref.grad.clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(p.grad.full_tensor(), mean / 2, msg=f"{names[0]} {shape}: {name}")
    except BaseException:  # every rank's traceback, in a file the parent reads
        Path(errors, f"rank{rank}.txt").write_text(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(0)  # see test_expert_parallel: a spawned gloo rank can hang in teardown


# FULL_SHARD only: torch 2.7's HSDP post-backward asserts on a CUDA event that CPU runs never record
# (`assert all_reduce_event is not None`), so HYBRID_SHARD cannot run on CPU at all.
@pytest.mark.parametrize("shape", [(2,)], ids=["FULL_SHARD"])
def test_fsdp2_on_gloo_averages_gradients(shape, tmp_path):
    mp.start_processes(_worker, args=(free_port(), shape, str(tmp_path)), nprocs=2, start_method="spawn")
    found = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert not found, "\n".join(found)
