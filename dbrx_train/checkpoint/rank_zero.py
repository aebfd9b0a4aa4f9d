"""Steps that run on rank 0 only (listing a folder, committing a checkpoint) and whose result every
rank needs; if the step fails, every rank raises, instead of the others waiting in a collective for a
rank that has died. And each rank's share of work that all ranks split (hashing, uploading files).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from composer.utils import dist


def _broadcast_from_rank0(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankError(RuntimeError):
    """Raised on every rank when one rank's step failed, so that no rank waits for it in a collective."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank}: {detail}")
        self.detail = detail  # the failing step's own message


def rank_share(items: list[Any]) -> list[Any]:
    """This rank's share of a list every rank holds in the same order (every world_size-th item)."""
    return items[dist.get_global_rank() :: dist.get_world_size()]


def on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0; its result, or its error, on every rank."""
    result, error = None, None
    if dist.get_global_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
            error = f"{type(e).__name__}: {e}"
    result, error = _broadcast_from_rank0((result, error))
    if error is not None:
        raise RankError(0, error)
    return result
