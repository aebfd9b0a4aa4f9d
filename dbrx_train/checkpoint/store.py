"""Checkpoint folders that are either complete and verified or ignored: commit, manifest, verify, rotate.

A checkpoint is a folder `ep<E>-ba<B>/` inside the run folder. It is written under a hidden temporary
name (`.tmp-ep<E>-ba<B>-<id>/`), its files are fsynced, a `manifest.json` with every file's size and
sha256 is written last, and only then is the folder renamed to its final name (atomic on POSIX).
So a crash or a full disk during a save leaves at most a `.tmp-*` folder, never a damaged checkpoint,
and the previous checkpoints are untouched. On resume the newest checkpoint whose files match its
manifest is used; a damaged one is renamed `<name>.corrupt` (with the reason in `rejected.txt`)
and reported. Leftovers (`.replaced-*`, `.corrupt`) are rotated out with the checkpoints.

No Composer import: the file layout is Composer's (DCP folder, or `rank0.pt` when not sharded), the
rules are ours. What a checkpoint may contain when loaded is checked in safe_load.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbrx_train.atomic import fsync_path
from dbrx_train.config.schema import ConfigError, parse_time

MANIFEST = "manifest.json"
FORMAT = "dbrx-train-checkpoint/1"
TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
REPLACED_INFIX = ".replaced-"
REJECTED_NOTE = "rejected.txt"  # inside a `.corrupt` folder: why it was moved aside
MONOLITH_FILE = "rank0.pt"  # an unsharded (no FSDP) checkpoint inside its folder
NAME_RE = re.compile(r"^ep(\d+)-ba(\d+)$")
# The manifest's position counters (saver.py writes them), by Composer time unit.
MANIFEST_COUNTERS = {"ba": "batch", "ep": "epoch", "sp": "sample", "tok": "token"}
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, incomplete or unsafe. The message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    @property
    def load_path(self) -> Path:
        """What Composer's load_path takes: the DCP folder, or the .pt file inside it."""
        return self.path if self.manifest["sharded"] else self.path / MONOLITH_FILE


# ---------------------------------------------------------------------------------------------
# Durable writes
# ---------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of one checkpoint file; fsyncs it first so the manifest never outlives the data."""
    fsync_path(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def temp_folder(run_folder: Path, name: str) -> Path:
    return run_folder / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def commit(tmp: Path, final: Path, manifest: dict[str, Any]) -> Checkpoint:
    """Write the manifest into the finished temporary folder, then rename it into place."""
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():
        # Same name again (a resume that fell back past it): keep the old one aside, never delete it here.
        final.rename(final.with_name(f"{final.name}{REPLACED_INFIX}{uuid.uuid4().hex[:8]}"))
    os.rename(tmp, final)
    fsync_path(final.parent)
    return Checkpoint(final, manifest)


# ---------------------------------------------------------------------------------------------
# Listing and verifying
# ---------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it is not a complete dbrx-train checkpoint"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    return manifest


def list_checkpoints(run_folder: Path) -> list[Checkpoint]:
    """Committed checkpoints (a manifest is present) in the run folder, oldest first."""
    found = []
    if not run_folder.is_dir():
        return found
    for path in run_folder.iterdir():
        if path.is_dir() and NAME_RE.match(path.name) and (path / MANIFEST).is_file():
            try:
                found.append(Checkpoint(path, read_manifest(path)))
            except CheckpointError:
                continue  # reported when it is the candidate; a bad manifest is a bad checkpoint
    return sorted(found, key=lambda c: (c.batch, c.name))


def verify_files(checkpoint: Checkpoint, names: Iterable[str] | None = None, *, hashes: bool = True) -> None:
    """Every listed file present, with its recorded size (and sha256 when `hashes`)."""
    files: dict[str, dict[str, Any]] = checkpoint.manifest["files"]
    for name in files if names is None else names:
        record = files[name]
        path = checkpoint.path / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(
                f"{path} has {size} bytes, its manifest says {record['bytes']} (truncated?)"
            )
        if hashes and sha256_file(path) != record["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 in its manifest (corrupted)")


def quarantine(checkpoint: Checkpoint, reason: str = "") -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never loaded again), noting why."""
    target = checkpoint.path.with_name(checkpoint.name + CORRUPT_SUFFIX)
    if target.exists():
        target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:8]}")
    checkpoint.path.rename(target)
    if reason:
        try:
            (target / REJECTED_NOTE).write_text(reason + "\n")
        except OSError:
            pass  # the note is a convenience; the rename is what matters
    return target


def rejected_checkpoints(run_folder: Path) -> list[tuple[str, int, str]]:
    """(name, batch, why) of every checkpoint-like folder that cannot be resumed from: damaged ones
    moved aside as `.corrupt`, and `ep*-ba*` folders whose manifest is missing or unreadable."""
    found = []
    if not run_folder.is_dir():
        return found
    for path in run_folder.iterdir():
        name, corrupt, _ = path.name.partition(CORRUPT_SUFFIX)
        match = NAME_RE.match(name)
        if not path.is_dir() or not match:
            continue
        if corrupt:
            note = path / REJECTED_NOTE
            why = note.read_text().strip() if note.is_file() else "damaged"
            found.append((path.name, int(match.group(2)), why))
        else:
            try:
                read_manifest(path)
            except CheckpointError as e:
                found.append((path.name, int(match.group(2)), str(e)))
    return sorted(found, key=lambda item: (item[1], item[0]))


def _has_manifest(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except CheckpointError:
        return False
    return True


def _leftover_batch(path: Path) -> int | None:
    """The batch of a `<name>.replaced-*` or `<name>.corrupt*` folder, else None."""
    for marker in (REPLACED_INFIX, CORRUPT_SUFFIX):
        name, found, _ = path.name.partition(marker)
        if found and (match := NAME_RE.match(name)):
            return int(match.group(2))
    return None


def remove_stale_temporaries(run_folder: Path) -> list[str]:
    """`.tmp-*` folders are saves that never committed (the process died mid-save)."""
    removed = []
    if run_folder.is_dir():
        for path in run_folder.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def rotate(run_folder: Path, keep: int, just_saved: str | None = None) -> list[str]:
    """Keep the newest `keep` committed checkpoints (counted on disk, so across resumes); -1 keeps all.

    Called right after a save committed; at least one checkpoint, and always `just_saved`, is kept.
    Leftovers go with them: a `.replaced-*` folder (an older copy of a name committed again, with its
    manifest) once a checkpoint at or past its batch is committed; a `.corrupt` one (kept for
    inspection) once rotation has passed its batch.
    """
    checkpoints = list_checkpoints(run_folder)
    doomed = []
    if keep >= 0:
        doomed = [c for c in checkpoints[: max(0, len(checkpoints) - max(keep, 1))] if c.name != just_saved]
    for checkpoint in doomed:
        shutil.rmtree(checkpoint.path)
    kept = [c.batch for c in checkpoints if c not in doomed]
    newest, oldest = max(kept, default=None), min(kept, default=None)
    removed = [c.name for c in doomed]
    for path in sorted(run_folder.iterdir()) if run_folder.is_dir() else []:
        batch = _leftover_batch(path)
        if batch is None or newest is None:
            continue
        if REPLACED_INFIX in path.name:
            # A superseded copy of a committed checkpoint; a folder that never had a manifest is not ours.
            superseded = batch <= newest and _has_manifest(path)
        else:  # .corrupt: kept for inspection while rotation still keeps checkpoints as old as it
            superseded = keep >= 0 and batch < oldest
        if superseded:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def reached_max_duration(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint is the end of its run: its position reached the max_duration its manifest's
    config asked for (so a rerun would have nothing to train)."""
    config = checkpoint.manifest.get("config") or {}
    try:
        max_duration = parse_time(config.get("max_duration"), "max_duration", units=tuple(MANIFEST_COUNTERS))
    except ConfigError:  # none, or in dur: the manifest's counters cannot say
        return False
    return int(checkpoint.manifest.get(MANIFEST_COUNTERS[max_duration.unit.value], -1)) >= max_duration.value
