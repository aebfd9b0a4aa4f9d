"""What a run starts from, decided once before the Trainer exists.

`choose_start` picks the newest checkpoint whose files match their manifest (falling back past
damaged ones, which are moved aside and reported), refuses checkpoints that would run code when
loaded (safe_load.py), refuses a resume whose config changed in a way that would make the result
wrong (resume_guard.py), and deals with a previous run in the folder past the start:

    autoresume, no intact checkpoint left   stop, listing what was found and why each was rejected
    previous run finished                   replaced with `save_overwrite: true`, else refused
    previous run did not finish (or only    replaced only when `save_overwrite` names the folder;
      damaged checkpoints are left)         else refused: continue it (autoresume) or name it

A replaced run is never deleted before the new one exists: its files are moved to a sibling
`.{name}.replaced-<time>/` and removed when the new run finishes (`remove_replaced_runs`).
"""

from __future__ import annotations

import copy
import datetime
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from composer.utils import dist

from dbrx_train.checkpoint import safe_load, store
from dbrx_train.checkpoint.rank_zero import RankError, on_rank0, rank_share
from dbrx_train.checkpoint.remote import RemoteCheckpoints
from dbrx_train.checkpoint.resume_guard import check_resume_config
from dbrx_train.checkpoint.run_lock import LOCK_FILE
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
    # autoresume found checkpoints but none intact: (name, batch, why) of each; the run may only start over
    # when save_overwrite names the folder.
    rejected: list[tuple[str, int, str]] = field(default_factory=list)
    autoresumed: bool = False  # continuing the run in its own folder (its damaged checkpoints are its own)

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
            incomplete = on_rank0(lambda: store.rejected_checkpoints(run_folder))
            newer = [
                (name, why)
                for name, batch, why in incomplete
                if batch > checkpoint.batch
                and store.CORRUPT_SUFFIX not in name  # those were reported when found
            ]
            if newer and dist.get_global_rank() == 0:
                skipped = "; ".join(f"{name}: {why}" for name, why in newer)
                print(
                    f"dbrx-train: not resuming from newer folders that are not intact checkpoints ({skipped})",
                    flush=True,
                )
            return checkpoint
        moved = on_rank0(lambda checkpoint=checkpoint, problem=problem: store.quarantine(checkpoint, problem))
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
    remote: RemoteCheckpoints,
    run_folder: Path,
    local: Checkpoint | None,
    *,
    hashes: bool,
    rejected: list[tuple[str, int, str]],
) -> Checkpoint | None:
    """A checkpoint in the object store newer than the local one, downloaded and verified; else None.
    Damaged copies in the store are reported and added to `rejected`."""
    try:
        listed = on_rank0(remote.list)
    except RankError as e:
        raise CheckpointError(
            f"save_folder {remote.uri}: could not list its checkpoints ({e.detail}). Check the URI and the "
            f"credentials for it (s3://: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance "
            f"role)"
        ) from None
    floor = local.batch if local is not None else -1
    for name, manifest in reversed(listed):
        if manifest["batch"] <= floor:
            break
        try:
            checkpoint = remote.download(name, manifest, run_folder, hashes=hashes)
        except CheckpointError as e:
            if dist.get_global_rank() == 0:
                print(f"dbrx-train: {e}; trying the previous one", flush=True)
            rejected.append((f"{remote.uri}/{name}", int(manifest["batch"]), str(e)))
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
    rejected: list[tuple[str, int, str]] = []
    if autoresume:
        checkpoint = newest_good_checkpoint(run_folder, hashes=hashes)
        if remote is not None:
            newer = newer_in_store(remote, run_folder, checkpoint, hashes=hashes, rejected=rejected)
            checkpoint = newer or checkpoint
        if checkpoint is not None:
            return Start(str(checkpoint.load_path), False, checkpoint, resumed=True, autoresumed=True)
        rejected = on_rank0(lambda: store.rejected_checkpoints(run_folder)) + rejected
    if load_path is None:
        return Start(None, False, None, resumed=False, rejected=rejected)
    resolved, checkpoint = explicit_checkpoint(load_path, hashes=hashes)
    return Start(resolved, load_weights_only, checkpoint, resumed=not load_weights_only, rejected=rejected)


def later_checkpoints(run_folder: Path, start: Start) -> list[Checkpoint]:
    """Checkpoints in the run folder past the starting point: another run's, or a rewound one's future."""
    return [c for c in store.list_checkpoints(run_folder) if c.batch > start.batch]


@dataclass(frozen=True)
class PreviousRun:
    """What the run folder holds past this run's start."""

    checkpoints: list[Checkpoint]  # intact, oldest first
    rejected: list[tuple[str, int, str]]  # damaged or incomplete: (name, batch, why)

    @property
    def finished(self) -> bool:
        return bool(self.checkpoints) and store.reached_max_duration(self.checkpoints[-1])

    def describe(self) -> str:
        if self.checkpoints:
            newest = self.checkpoints[-1]
            goal = (newest.manifest.get("config") or {}).get("max_duration", "?")
            return f"newest checkpoint {newest.name}, batch {newest.batch} of max_duration {goal}"
        return "only damaged checkpoints: " + ", ".join(name for name, _, _ in self.rejected)


def previous_run(run_folder: Path, start: Start) -> PreviousRun | None:
    later = later_checkpoints(run_folder, start)
    rejected = [r for r in store.rejected_checkpoints(run_folder) if r[1] > start.batch]
    return PreviousRun(later, rejected) if later or rejected else None


def names_folder(save_overwrite: bool | str, run_folder: Path) -> bool:
    """`save_overwrite: <folder>`: the user named this run folder as the one to replace."""
    return isinstance(save_overwrite, str) and Path(save_overwrite).resolve() == run_folder.resolve()


def no_intact_checkpoint(run_folder: Path, rejected: list[tuple[str, int, str]]) -> CheckpointError:
    found = "; ".join(f"{name}: {why}" for name, _, why in reversed(rejected))
    return CheckpointError(
        f"autoresume found no intact checkpoint in {run_folder}, so it will not start over. Found: {found}. "
        f"Restore a checkpoint from a copy, or start over with save_overwrite={run_folder}"
    )


def set_aside(run_folder: Path, start: Start, previous: PreviousRun) -> Path:
    """Move the replaced run out of the way, into `.{name}.replaced-<time>/` next to the run folder: all of
    it for a run starting at batch 0, else the checkpoints past the start (and copies of the .jsonl logs,
    which the new run truncates to its start)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = run_folder.parent / f".{run_folder.name}.replaced-{stamp}"
    aside.mkdir()
    if start.batch == 0:
        moving = [p for p in run_folder.iterdir() if p.name != LOCK_FILE]
    else:
        moving = [c.path for c in previous.checkpoints] + [
            run_folder / name for name, _, _ in previous.rejected
        ]
        for log_file in run_folder.glob("*.jsonl"):
            shutil.copy2(log_file, aside / log_file.name)
    for path in moving:
        path.rename(aside / path.name)
    store.fsync_path(aside)
    store.fsync_path(run_folder)
    return aside


def remove_replaced_runs(run_folder: Path) -> list[Path]:
    """Once a run has finished in `run_folder`, the runs it replaced are deleted (rank 0 calls this)."""
    doomed = sorted(run_folder.parent.glob(f".{run_folder.name}.replaced-*"))
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


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
    explicit = names_folder(cfg.save_overwrite, run_folder)
    if isinstance(cfg.save_overwrite, str) and not explicit:
        raise ConfigError(
            f"save_overwrite names {cfg.save_overwrite}, but this run's folder is {run_folder}: name the run "
            f"folder to replace (or use true / false)"
        )
    if start.rejected and not explicit:
        raise no_intact_checkpoint(run_folder, start.rejected)
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
    if start.autoresumed:
        return start  # the newest intact checkpoint of this folder: nothing past it but its own damaged saves
    previous = on_rank0(lambda: previous_run(run_folder, start))
    if previous is None:
        return start
    if start.checkpoint is not None and any(c.path == start.checkpoint.path for c in previous.checkpoints):
        raise ConfigError(
            f"load_path {start.checkpoint.path} lies in save_folder {run_folder}, and this run starts at batch "
            f"{start.batch} (load_weights_only): its own checkpoints would mix with that one. Choose another "
            f"save_folder"
        )
    if not (explicit or (cfg.save_overwrite is True and previous.finished)):
        if previous.finished:
            raise ConfigError(
                f"save_folder {run_folder} already holds a finished run past this run's start (batch "
                f"{start.batch}; {previous.describe()}): set autoresume: true to find it finished (and extend "
                f"it with a longer max_duration), save_overwrite: true to replace it, or choose another "
                f"save_folder/run_name"
            )
        raise ConfigError(
            f"save_folder {run_folder} holds a run that did not finish ({previous.describe()}): continue it "
            f"with autoresume=true, or discard it with save_overwrite={run_folder}"
        )
    dist.barrier()  # every rank has decided before rank 0 moves the old run
    aside = on_rank0(lambda: set_aside(run_folder, start, previous))
    if dist.get_global_rank() == 0:
        print(
            f"dbrx-train: save_overwrite: the previous run in {run_folder} ({previous.describe()}) was moved to "
            f"{aside}; it is deleted when this run finishes",
            flush=True,
        )
    return start


def normalized_config(saved: dict) -> dict:
    """The checkpoint's config through today's schema, so keys added since then compare as their defaults."""
    try:
        return resolved_dict(parse_config(copy.deepcopy(saved)))
    except ConfigError:
        return saved  # a key since removed or renamed: compare what was written
