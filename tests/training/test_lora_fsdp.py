"""LoRA under FSDP2 mixed precision (what amp_bf16 on GPUs runs), on 2 gloo ranks: the frozen base held
in bf16, the adapters, their gradients and optimizer state in fp32, each adapter an FSDP unit of its own
(FSDP2 needs one dtype per unit); the adapters' gradients equal those of an unsharded model computing in bf16,
averaged over both ranks."""

from __future__ import annotations

import copy
import datetime
import faulthandler
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.model.test_lora import ALL, randomize_adapters, small_model
from tests.training.test_expert_parallel import free_port


def _worker(rank: int, port: int, errors: str) -> None:
    import torch.distributed as dist
    from composer.core import Precision
    from composer.distributed.fsdp2 import prepare_fully_shard
    from composer.distributed.fsdp2_utils import generate_composer_model_policy
    from composer.utils.parallelism import FSDP2Config
    from torch.distributed.tensor import DTensor

    from dbrx_train.config.run import FSDPConfig
    from dbrx_train.model.lora import apply_lora, is_adapter
    from dbrx_train.training.composer_model import DbrxComposerModel
    from dbrx_train.training.parallelize import average_gradients_on_gloo, hold_frozen_base, mark_fsdp_units

    faulthandler.dump_traceback_later(150, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        average_gradients_on_gloo()
        model = small_model()
        apply_lora(model, ALL)
        randomize_adapters(model)  # B != 0, so A gets gradients too
        exact = copy.deepcopy(model)  # fp32 throughout, unsharded
        # What FSDP computes with, unsharded: every parameter and buffer cast to bf16 but the RoPE tables
        # (they reach the blocks as a RopeTables object, which FSDP2's input casting leaves fp32).
        reference = copy.deepcopy(model)
        for name, t in (*reference.named_parameters(), *reference.named_buffers()):
            if not name.startswith("transformer.rotary."):
                t.data = t.data.to(torch.bfloat16)
        ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(rank))  # per-rank data

        assert hold_frozen_base(model, FSDPConfig(mixed_precision="DEFAULT"), "amp_bf16") == torch.bfloat16
        base_bf16 = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter(n)}
        mark_fsdp_units(model)
        composer_model = DbrxComposerModel(model)
        prepare_fully_shard(  # what Composer's Trainer does with fsdp_config under amp_bf16
            composer_model, FSDP2Config(), Precision.AMP_BF16, generate_composer_model_policy(composer_model)
        )
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        for name, p in params.items():
            assert p.dtype == (torch.float32 if is_adapter(name) else torch.bfloat16), (name, p.dtype)
        optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2)

        loss = model(ids, labels=ids).loss
        loss.backward()
        reference(ids, labels=ids).loss.backward()
        exact_loss = exact(ids, labels=ids).loss
        assert abs(loss.item() - exact_loss.item()) < 2e-2 * exact_loss.item(), (
            loss.item(),
            exact_loss.item(),
        )
        ref_params = dict(reference.named_parameters())
        for name, p in params.items():
            if not is_adapter(name):
                assert p.grad is None, name
                continue
            assert p.grad.dtype == torch.float32, name
            mean = ref_params[name].grad.float()
            dist.all_reduce(mean)  # FSDP reduces the bf16 gradients in fp32 (DEFAULT), averaged over ranks
            torch.testing.assert_close(p.grad.full_tensor(), mean / 2, atol=1e-6, rtol=1e-3, msg=name)
        optimizer.step()
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
        for name, p in params.items():  # the base untouched, the adapters moved
            full = p.detach().full_tensor()
            if is_adapter(name):
                assert not torch.equal(full, dict(exact.named_parameters())[name].detach()), name
            else:
                assert torch.equal(full, base_bf16[name]), name
    except BaseException:  # every rank's traceback, in a file the parent reads
        Path(errors, f"rank{rank}.txt").write_text(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(0)  # see test_expert_parallel: a spawned gloo rank can hang in teardown


def test_bf16_base_and_fp32_adapters_under_fsdp2_on_two_ranks(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    found = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert not found, "\n".join(found)
