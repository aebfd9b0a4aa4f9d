"""`register_shm_prefix` across ranks: the node's first rank registers, the others learn its prefix,
and a failure of the first rank reaches every rank (no rank left waiting in a collective)."""

from __future__ import annotations

import faulthandler
import traceback
from datetime import timedelta

import pytest
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from streaming.base.constant import LOCALS
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _check_and_find, _get_path, _pack_locals
from streaming.base.world import World

from dbrx_train.data.streaming_shm import SHM_DIR, register_shm_prefix


def _rank(rank: int, store: str, local: str, remote: str | None, results) -> None:
    # A rank still here after 90 s prints where it waits: a rare hang, cause not found yet.
    faulthandler.dump_traceback_later(90)
    # A file store: no port another test could take between choosing it and binding it (a rank then
    # waited forever); a timeout: a rank whose peer died does not wait Composer's 30 minutes.
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        prefix, registry = register_shm_prefix([local], [remote], World(1, 2, 1, rank), retry=3)
        results.put((rank, "ok", prefix))
        torch_dist.barrier()  # the leader keeps its registry until the other rank has read it
        registry.cleanup()
    except Exception as e:  # noqa: BLE001 (reported to the test)
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-400:]}"))
    finally:
        torch_dist.destroy_process_group()


def _run_two_ranks(local: str, remote: str | None) -> dict[int, tuple[str, object]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = f"{local}.store"  # beside the test's local folder, in its tmp_path
    procs = [ctx.Process(target=_rank, args=(r, store, local, remote, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert not p.is_alive(), "a rank is still waiting: the leader's outcome did not reach it"
    return {rank: (kind, value) for rank, kind, value in (results.get(timeout=5) for _ in procs)}


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
def test_ranks_share_the_prefix_their_leader_registered(tmp_path):
    out = _run_two_ranks(str(tmp_path / "local"), None)
    assert out[0][0] == out[1][0] == "ok", out
    assert out[0][1] == out[1][1]


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
def test_a_leader_that_cannot_register_fails_every_rank(tmp_path):
    # A live dataset elsewhere already uses this local folder with a remote: Streaming refuses a
    # second one ("Reused local directory"), on the leader only.
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    prefix = _check_and_find([local], [remote], LOCALS)
    data = _pack_locals([local], prefix)
    held = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
    held.buf[: len(data)] = data
    try:
        out = _run_two_ranks(local, remote)
    finally:
        held.cleanup()
    assert out[0][0] == "error" and "Reused local directory" in out[0][1], out
    assert out[1][0] == "error" and "the first rank of this node could not register" in out[1][1], out
    assert "Reused local directory" in out[1][1]
