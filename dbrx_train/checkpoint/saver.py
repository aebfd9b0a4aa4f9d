"""`CheckpointManager`: checkpoints through one callback.

It replaces Composer's CheckpointSaver: it lets Composer write the state (FSDP sharded DCP or one
.pt) into a temporary folder, then hashes the files on all ranks in parallel, writes the manifest
and commits the folder with a rename (store.py). It saves every `save_interval`, at the end of
training, and whenever training stops early (preemption, non-finite loss), and rotates old
checkpoints by what is on disk, so the count survives resumes.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import composer
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torch.distributed.checkpoint.api import CheckpointException

from dbrx_train.checkpoint import safe_load, store
from dbrx_train.checkpoint.rank_zero import RankError, on_rank0, rank_share
from dbrx_train.checkpoint.remote import RemoteCheckpoints
from dbrx_train.checkpoint.store import Checkpoint

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


def describe_error(error: BaseException) -> str:
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
        base_model: dict[str, Any] | None = None,
    ):
        self.run_folder = Path(run_folder)
        # A LoRA run's checkpoints leave out the frozen base: the manifest names it (checkpoint/adapters.py).
        self.base_model = base_model
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
            f"checkpoint {name} could not be written to {self.run_folder} ({describe_error(error)}; a full disk "
            f"or a file size limit shows up like this). "
            f"Earlier checkpoints are intact (latest: {previous}); free disk space or fix the folder, "
            f"then rerun the same command with autoresume: true to continue from the latest one."
        )

    @staticmethod
    def _complete_files(folder: Path, sharded: bool) -> list[str]:
        names = store.checkpoint_files(folder)
        missing = safe_load.dcp_data_files(folder) - set(names) if sharded else set()
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
        if self.base_model is not None:
            manifest["base_model"] = self.base_model
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
                    f"failed ({describe_error(e)}); rerun with autoresume: true to continue from the local copy"
                ) from e
        return checkpoint
