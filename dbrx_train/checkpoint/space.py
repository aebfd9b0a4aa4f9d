"""Room for checkpoints and HF exports, checked before the first step.

A save writes the whole checkpoint before rotation removes an old one, and HF exports are never
deleted; a run that cannot write even one of either is refused before it starts, one that will run
out later is warned at the start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from composer.core import Time, TimeUnit

from dbrx_train.checkpoint import store
from dbrx_train.checkpoint.rank_zero import on_rank0
from dbrx_train.model.hf import EXPORT_DTYPES

OPTIMIZER_MOMENTS = {"decoupled_lionw": 1}  # state tensors per parameter; Adam variants keep 2


def human_size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def checkpoint_space(
    run_folder: Path, parameters: list[torch.Tensor], optimizer: str, keep: int, to_write: int | None
) -> tuple[str | None, str | None]:
    """(error, warning) for the free space where this run's checkpoints go; every rank gets rank 0's.

    A save writes the whole checkpoint before rotation removes an old one, so the folder needs room
    for one more. Its size is that of the newest checkpoint already there (exact), or else the
    parameters (global sizes, also when sharded or on meta) times 1 + the optimizer's moments.
    Warns when what the run will hold at its fullest will not fit: `to_write` more checkpoints
    (None: unknown, e.g. a duration in tokens), or with rotation (`keep` > 0) keep + the one being
    written. Such a run would stop at a later save, hours in (earlier checkpoints stay intact).
    """

    if to_write == 0:  # resumed at its end: nothing more is written
        return None, None

    def check() -> tuple[str | None, str | None]:
        on_disk = store.list_checkpoints(run_folder)
        files = on_disk[-1].manifest.get("files") if on_disk else None
        if files:
            need = sum(int(record.get("bytes", 0)) for record in files.values())
            how = f"the size of {on_disk[-1].name}"
        else:
            numel = sum(p.numel() for p in parameters)
            weights = sum(p.numel() * p.element_size() for p in parameters)
            moments = OPTIMIZER_MOMENTS.get(optimizer, 2)
            need = weights * (1 + moments)
            how = f"{numel / 1e6:.1f}M parameters and {moments} {optimizer} moments per parameter"
        free = shutil.disk_usage(run_folder).free
        where = f"{run_folder} (where checkpoints are written)"
        if free < need:
            elsewhere = (
                f" with load_path: {run_folder} to continue from {on_disk[-1].name}" if on_disk else ""
            )
            return (
                f"{where} has {human_size(free)} free, but one checkpoint of this run takes about {human_size(need)} "
                f"({how}), written in full before any older one is rotated out. Free space there, or "
                f"choose another save_folder{elsewhere}",
                None,
            )
        peak = None if to_write is None else len(on_disk) + to_write
        if keep > 0:
            peak = keep + 1 if peak is None else min(peak, keep + 1)
        more = 0 if peak is None else peak - len(on_disk)
        if more > 1 and free < need * more:
            rotation = f"save_num_checkpoints_to_keep: {keep}" if keep > 0 else "keeping every checkpoint"
            return None, (
                f"{where} has {human_size(free)} free, but this run ({rotation}) needs room for {more} more "
                f"checkpoints of about {human_size(need)} each ({how}): a later save will fail for lack of space "
                f"(the earlier checkpoints stay intact)"
            )
        return None, None

    return on_rank0(check)


TOKENIZER_BYTES = 14 << 20  # tokenizer.json of cl100k_base + DBRX's tokens (13.8 MB) and two small files


def export_space(
    folder: Path, parameters: list[torch.Tensor], dtype: str, tokenizer: bool, to_write: int | None
) -> tuple[str | None, str | None]:
    """(error, warning) for the free space where HF exports go; every rank gets rank 0's.

    Exports are never deleted, so every one still to come (`to_write`; None: unknown) must fit.
    One export is the parameters in `dtype` (+ the tokenizer files).
    """

    def check() -> tuple[str | None, str | None]:
        existing = folder
        while not existing.exists():  # the folder is made at the first export
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        numel = sum(p.numel() for p in parameters)
        need = numel * EXPORT_DTYPES[dtype].itemsize + (TOKENIZER_BYTES if tokenizer else 0)
        how = f"{numel / 1e6:.1f}M parameters in {dtype}" + (" + tokenizer files" if tokenizer else "")
        where = f"callbacks.hf_export.folder {folder}"
        if free < need:
            return (
                f"{where} has {human_size(free)} free, but one HF export of this run takes about "
                f"{human_size(need)} ({how}). Free space there, choose another folder, or set "
                f"callbacks.hf_export: null",
                None,
            )
        if to_write is not None and to_write > 1 and free < need * to_write:
            return None, (
                f"{where} has {human_size(free)} free, but this run writes {to_write} more HF exports of "
                f"about {human_size(need)} each ({how}; exports are never deleted): a later export will "
                f"fail for lack of space (checkpoints are written before it and stay intact)"
            )
        return None, None

    return on_rank0(check)


def saves_to_write(max_duration: str, save_interval: str, start_batch: int) -> int | None:
    """How many checkpoints (or HF exports) a run writes from start_batch on: one every save_interval,
    and one at the end when that is not a multiple of it. None when either is not in batches."""
    total, every = Time.from_timestring(max_duration), Time.from_timestring(save_interval)
    if total.unit != TimeUnit.BATCH or every.unit != TimeUnit.BATCH or every.value <= 0:
        return None
    at_interval = total.value // every.value - min(start_batch, total.value) // every.value
    return at_interval + (1 if total.value % every.value and start_batch < total.value else 0)
