"""Checkpoints through one callback, and the choice of what a run starts from.

`CheckpointManager` replaces Composer's CheckpointSaver: it lets Composer write the state (FSDP
sharded DCP or one .pt) into a temporary folder, then hashes the files on all ranks in parallel,
writes the manifest and commits the folder with a rename (dbrx_train/checkpoint_store.py). It saves
every `save_interval`, at the end of training, and whenever training stops early (preemption,
non-finite loss), and rotates old checkpoints by what is on disk, so the count survives resumes.

`resolve_start` runs before the Trainer exists: it picks the newest checkpoint whose files match
their manifest (falling back past damaged ones, which are moved aside and reported), refuses
checkpoints that would run code when loaded, and refuses a resume whose config changed in a way
that would make the result wrong (dbrx_train/training/resume_guard.py).
"""

from __future__ import annotations

import datetime
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import composer
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torch.distributed.checkpoint.api import CheckpointException

from dbrx_train import checkpoint_store as store
from dbrx_train.checkpoint_store import Checkpoint, CheckpointError
from dbrx_train.training.object_store import RemoteCheckpoints
from dbrx_train.training.rank_zero import RankError, on_rank0, rank_share

log = logging.getLogger("dbrx_train")


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, I/O error); the previous checkpoints are intact."""


def _hash_share(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each rank hashes every world_size-th file, so a large sharded checkpoint is hashed in parallel."""
    try:
        mine, error = {name: store.file_record(folder / name) for name in rank_share(names)}, None
    except OSError as e:
        mine, error = {}, f"{type(e).__name__}: {e}"
    merged: dict[str, dict[str, Any]] = {}
    for rank, (part, part_error) in enumerate(dist.all_gather_object((mine, error))):
        if part_error is not None:
            raise RankError(rank, part_error)
        merged.update(part)
    return merged


def _describe(error: BaseException) -> str:
    """One line per failing rank (DCP wraps each rank's exception with its traceback)."""
    if isinstance(error, CheckpointException):
        parts = []
        for rank, failure in sorted(error.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {type(inner).__name__}: {str(inner).strip().splitlines()[-1]}")
        return "; ".join(parts)
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


class CheckpointManager(Callback):
    def __init__(
        self,
        run_folder: str | Path,
        save_interval: str,
        keep: int,
        config: dict[str, Any],
        remote: RemoteCheckpoints | None = None,
    ):
        self.run_folder = Path(run_folder)
        self.remote = remote  # also upload every checkpoint there (all are kept in the store)
        self.should_save = create_interval_scheduler(save_interval)
        self.keep = keep
        self.config = config
        self.last_saved_batch: int | None = None
        self.saved: list[Checkpoint] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        # The checkpoint a run resumed from is not written again at its own batch.
        self.last_saved_batch = int(state.timestamp.batch)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_save(state, Event.BATCH_CHECKPOINT):
            self.save(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_save(state, Event.EPOCH_CHECKPOINT):
            self.save(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        # The end of training, or an early stop (preemption, non-finite loss): never leave work unsaved.
        self.save(state)

    def _commit(self, folder: Path, tmp_root: Path, name: str, manifest: dict[str, Any]) -> list[str]:
        store.commit(folder, self.run_folder / name, manifest)
        if tmp_root.exists():
            tmp_root.rmdir()  # the now-empty wrapper around Composer's folder
        return store.rotate(self.run_folder, self.keep, just_saved=name)

    def _failed(self, name: str, error: BaseException) -> CheckpointSaveError:
        if dist.get_global_rank() == 0:
            store.remove_stale_temporaries(self.run_folder)
        on_disk = store.list_checkpoints(self.run_folder)
        previous = on_disk[-1].name if on_disk else "none yet"
        return CheckpointSaveError(
            f"checkpoint {name} could not be written to {self.run_folder} ({_describe(error)}; a full disk "
            f"or a file size limit shows up like this). "
            f"Earlier checkpoints are intact (latest: {previous}); free disk space or fix the folder, "
            f"then rerun the same command with autoresume: true to continue from the latest one."
        )

    @staticmethod
    def _complete_files(folder: Path, sharded: bool) -> list[str]:
        names = store.checkpoint_files(folder)
        missing = store.dcp_data_files(folder) - set(names) if sharded else set()
        if missing:
            raise FileNotFoundError(
                f"rank 0 cannot see {sorted(missing)} written by other ranks: save_folder (or runs/{{run_name}} "
                f"for an object-store save_folder) must be on a filesystem that all nodes share"
            )
        return names

    def save(self, state: State) -> Checkpoint | None:
        batch = int(state.timestamp.batch)
        if batch == self.last_saved_batch:
            return None
        self.last_saved_batch = batch
        name = f"ep{int(state.timestamp.epoch)}-ba{batch}"
        tmp = on_rank0(lambda: store.temp_folder(self.run_folder, name))
        sharded = state.fsdp_sharded_state_dict_enabled
        # Sharded: Composer writes <tmp>/<its ep{epoch}-ba{batch} folder>/; monolithic: <tmp>/<name>/rank0.pt.
        filename = str(tmp / "x") if sharded else str(tmp / name / store.MONOLITH_FILE)
        try:
            written = composer_checkpoint.save_checkpoint(state, filename=filename)
            folder = on_rank0(lambda: Path(written).parent)
            names = on_rank0(lambda: self._complete_files(folder, sharded))
            files = _hash_share(folder, names)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._failed(name, e) from e
        manifest = {
            "format": store.FORMAT,
            "name": name,
            "batch": batch,
            "epoch": int(state.timestamp.epoch),
            "sample": int(state.timestamp.sample),
            "token": int(state.timestamp.token),
            "sharded": sharded,
            "world_size": dist.get_world_size(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "composer_version": composer.__version__,
            "files": files,
            "config": self.config,
        }
        try:
            deleted = on_rank0(lambda: self._commit(folder, Path(tmp), name, manifest))
        except RankError as e:
            raise self._failed(name, e) from e
        if dist.get_global_rank() == 0:
            rotated = f" (rotated out {', '.join(deleted)})" if deleted else ""
            log.info("saved checkpoint %s%s", self.run_folder / name, rotated)
        checkpoint = Checkpoint(self.run_folder / name, manifest)
        self.saved.append(checkpoint)
        if self.remote is not None:
            try:
                self.remote.upload(checkpoint)
            except Exception as e:
                raise CheckpointSaveError(
                    f"checkpoint {name} is committed in {self.run_folder} but its upload to {self.remote.uri} "
                    f"failed ({_describe(e)}); rerun with autoresume: true to continue from the local copy"
                ) from e
        return checkpoint


# ---------------------------------------------------------------------------------------------
# Room for checkpoints, checked before the first step
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# What a run starts from
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    load_path: str | None  # for Composer's Trainer(load_path=...)
    weights_only: bool
    checkpoint: Checkpoint | None  # a verified dbrx-train checkpoint, when there is one
    resumed: bool  # continuing a run (full state) rather than starting one

    @property
    def batch(self) -> int:
        return self.checkpoint.batch if self.checkpoint is not None and self.resumed else 0


def verify(checkpoint: Checkpoint, *, hashes: bool) -> str | None:
    """None if the checkpoint is complete, intact and safe; else what is wrong. Every rank checks a share."""
    problem = None
    try:
        store.verify_files(checkpoint, rank_share(sorted(checkpoint.manifest["files"])), hashes=hashes)
        if dist.get_global_rank() == 0:
            store.check_no_code(checkpoint.load_path)
    except (CheckpointError, OSError) as e:
        problem = str(e)
    problems = [p for p in dist.all_gather_object(problem) if p]
    return problems[0] if problems else None


def newest_good_checkpoint(run_folder: Path, *, hashes: bool) -> Checkpoint | None:
    """Newest first; a damaged one is reported and renamed `<name>.corrupt`, and the next is tried."""
    stale = on_rank0(lambda: store.remove_stale_temporaries(run_folder))
    if stale and dist.get_global_rank() == 0:
        log.warning("removed unfinished saves of a crashed run: %s", ", ".join(stale))
    for checkpoint in reversed(on_rank0(lambda: store.list_checkpoints(run_folder))):
        problem = verify(checkpoint, hashes=hashes)
        if problem is None:
            return checkpoint
        moved = on_rank0(lambda checkpoint=checkpoint: store.quarantine(checkpoint))
        if dist.get_global_rank() == 0:
            print(
                f"dbrx-train: checkpoint {checkpoint.name} is damaged: {problem}. "
                f"Moved it to {moved.name}; trying the previous one.",
                flush=True,
            )
    return None


def explicit_checkpoint(path: str, *, hashes: bool) -> tuple[str, Checkpoint | None]:
    """load_path as given: a run folder (its newest good checkpoint), a checkpoint folder, or a .pt file."""
    if "://" in path:
        return path, None  # an object store: Composer downloads it (not verified here; see docs)
    local = Path(path)
    if not local.exists():
        raise CheckpointError(f"load_path {path} does not exist")
    if local.is_dir() and not (local / store.MANIFEST).is_file() and not (local / ".metadata").is_file():
        checkpoint = newest_good_checkpoint(local, hashes=hashes)
        if checkpoint is None:
            raise CheckpointError(
                f"load_path {path} holds no complete checkpoint (no ep*-ba*/{store.MANIFEST})"
            )
        return str(checkpoint.load_path), checkpoint
    folder = local if local.is_dir() else local.parent
    if (folder / store.MANIFEST).is_file():
        checkpoint = Checkpoint(folder, store.read_manifest(folder))
        problem = verify(checkpoint, hashes=hashes)
        if problem is not None:
            raise CheckpointError(f"load_path {path}: {problem}")
        return str(checkpoint.load_path), checkpoint
    # A checkpoint written by Composer itself (no manifest): no checksums to verify, but no code either.
    try:
        on_rank0(lambda: store.check_no_code(local))
    except RankError as e:
        raise CheckpointError(f"load_path {path}: {e.detail}") from None
    log.warning("load_path %s has no %s: loading it without checksum verification", path, store.MANIFEST)
    return path, None


def newer_in_store(
    remote: RemoteCheckpoints, run_folder: Path, local: Checkpoint | None, *, hashes: bool
) -> Checkpoint | None:
    """A checkpoint in the object store newer than the local one, downloaded and verified; else None."""
    listed = on_rank0(remote.list)
    floor = local.batch if local is not None else -1
    for name, manifest in reversed(listed):
        if manifest["batch"] <= floor:
            break
        try:
            checkpoint = remote.download(name, manifest, run_folder, hashes=hashes)
        except CheckpointError as e:
            if dist.get_global_rank() == 0:
                print(f"dbrx-train: {e}; trying the previous one", flush=True)
            continue
        problem = verify(checkpoint, hashes=False)  # the no-code check (files were verified on download)
        if problem is not None:
            raise CheckpointError(f"{remote.uri}/{name}: {problem}")
        log.info("downloaded checkpoint %s from %s", name, remote.uri)
        return checkpoint
    return None


def resolve_start(
    run_folder: Path,
    *,
    autoresume: bool,
    load_path: str | None,
    load_weights_only: bool,
    hashes: bool,
    remote: RemoteCheckpoints | None = None,
) -> Start:
    if autoresume:
        checkpoint = newest_good_checkpoint(run_folder, hashes=hashes)
        if remote is not None:
            checkpoint = newer_in_store(remote, run_folder, checkpoint, hashes=hashes) or checkpoint
        if checkpoint is not None:
            return Start(str(checkpoint.load_path), False, checkpoint, resumed=True)
    if load_path is None:
        return Start(None, False, None, resumed=False)
    resolved, checkpoint = explicit_checkpoint(load_path, hashes=hashes)
    return Start(resolved, load_weights_only, checkpoint, resumed=not load_weights_only)


def later_checkpoints(run_folder: Path, start: Start) -> list[Checkpoint]:
    """Checkpoints in the run folder past the starting point: another run's, or a rewound one's future."""
    return [c for c in store.list_checkpoints(run_folder) if c.batch > start.batch]
