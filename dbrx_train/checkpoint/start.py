"""What a run starts from, decided once before the Trainer exists.

`choose_start` picks the newest checkpoint whose files match their manifest (falling back past
damaged ones, which are moved aside and reported), refuses checkpoints that would run code when
loaded (safe_load.py), refuses a resume whose config changed in a way that would make the result
wrong (resume_guard.py), and deals with checkpoints past the start (`save_overwrite`).
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from composer.utils import dist

from dbrx_train.checkpoint import safe_load, store
from dbrx_train.checkpoint.rank_zero import RankError, on_rank0, rank_share
from dbrx_train.checkpoint.remote import RemoteCheckpoints
from dbrx_train.checkpoint.resume_guard import check_resume_config
from dbrx_train.checkpoint.store import Checkpoint, CheckpointError
from dbrx_train.config.run import TrainConfig, parse_config, resolved_dict
from dbrx_train.config.schema import ConfigError

log = logging.getLogger("dbrx_train")


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
            safe_load.check_no_code(checkpoint.load_path)
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
        on_rank0(lambda: safe_load.check_no_code(local))
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


def choose_start(
    cfg: TrainConfig, run_folder: Path, resolved: dict, remote: RemoteCheckpoints | None
) -> Start:
    """What the run loads (autoresume's newest good checkpoint, or load_path), checked before any work."""
    start = resolve_start(
        run_folder,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        hashes=cfg.checkpoint_verify == "hash",
        remote=remote,
    )
    if start.checkpoint is not None and start.resumed:
        saved = normalized_config(start.checkpoint.manifest.get("config") or {})
        try:
            accepted = check_resume_config(saved, resolved, cfg.allow_config_changes, start.checkpoint.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        interesting = [line for line in accepted if not line.startswith(("run_name", "save_folder"))]
        if interesting and dist.get_global_rank() == 0:
            log.info("resuming with changed settings: %s", "; ".join(interesting))
        log.info("resuming from %s (batch %d)", start.checkpoint.path, start.checkpoint.batch)
    later = later_checkpoints(run_folder, start)
    if start.checkpoint is not None and any(c.path == start.checkpoint.path for c in later):
        raise ConfigError(
            f"load_path {start.checkpoint.path} lies in save_folder {run_folder}, and this run starts at batch "
            f"{start.batch} (load_weights_only): its own checkpoints would mix with that one. Choose another "
            f"save_folder"
        )
    if later:
        names = ", ".join(c.name for c in later)
        if not cfg.save_overwrite:
            raise ConfigError(
                f"save_folder {run_folder} already holds checkpoints past this run's start (batch {start.batch}): "
                f"{names}. Set autoresume: true to continue that run, save_overwrite: true to replace them, "
                f"or choose another save_folder"
            )
        dist.barrier()  # every rank has listed them before rank 0 deletes them
        on_rank0(lambda: [shutil.rmtree(checkpoint.path) for checkpoint in later])
        log.warning("save_overwrite: removed checkpoints past the start (batch %d): %s", start.batch, names)
    return start


def normalized_config(saved: dict) -> dict:
    """The checkpoint's config through today's schema, so keys added since then compare as their defaults."""
    try:
        return resolved_dict(parse_config(copy.deepcopy(saved)))
    except ConfigError:
        return saved  # a key since removed or renamed: compare what was written
