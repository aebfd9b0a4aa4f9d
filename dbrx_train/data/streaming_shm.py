"""Streaming's shared memory left behind by killed runs, removed without touching live ones.

A StreamingDataset keeps its state in POSIX shared memory, `/dev/shm/<prefix>_<name>` (six-digit
prefix per dataset), plus lock files `<tmp>/<prefix>_barrier_filelock` / `_cache_filelock`.
Python removes the memory at exit; a SIGKILL of the whole job (OOM killer, `scancel`, `docker
kill`, `kill -9` of the process group) leaves it behind. Streaming 0.13 then moves on to the next
free prefix, so the next run starts, but every killed run leaks its segments (the epoch's sample
ids alone take 8 bytes per sample) until /dev/shm is full.

Streaming's own `clean_stale_shared_memory()` removes *every* Streaming segment on the machine,
including those of runs still going (another job on the node, a test run next to it), which
breaks them. Here a prefix counts as stale only when no live process maps any of its segments
(read from /proc/<pid>/maps), so any process may call this at any time, and every rank does:
ranks of one node race harmlessly over the same removals.

`exclusive_shm_prefix()` replaces Streaming's prefix choice while a dataset is built. Streaming
has every rank probe /dev/shm for the first free prefix on its own, then the node's first rank
creates it (replacing a segment of that name if one appeared meanwhile); two jobs (or two datasets
of two processes) starting in the same instant pick the same prefix, and one of them fails with a
FileExistsError or "shared memory registered does not match local leader" (seen in our test
suite). Here only the node's first rank probes, creates the prefix's registry segment exclusively
(O_EXCL: losing a race means probing again) and tells the other ranks which prefix it got.

The lock files stay (empty files; Streaming leaves them behind for every prefix it ever used).
They keep the prefix taken: each rank of a job picks its prefix on its own, skipping prefixes
with lock files or segments, so freeing a prefix while the ranks of a running job are picking
one could make them pick different ones (Streaming then stops with "shared memory registered
does not match local leader").
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import streaming.base.dataset as streaming_dataset
import torch.distributed as torch_dist
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import (
    _check_and_find_retrying,
    _check_self,
    _get_path,
    _pack_locals,
    _unpack_locals,
)
from streaming.base.world import World

from dbrx_train import compat

SHM_DIR = Path("/dev/shm")
PROC_DIR = Path("/proc")
_SEGMENT = re.compile(rf"^(\d{{6}})_({'|'.join(map(re.escape, SHM_TO_CLEAN))})$")


def release_stale_shared_memory(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> list[str]:
    """Remove this user's Streaming segments of every prefix that no live process maps, keeping
    the prefix taken (see above). Returns the prefixes. Does nothing without /dev/shm or /proc."""
    if not shm_dir.is_dir() or not proc_dir.is_dir():
        return []
    segments: dict[str, list[str]] = {}
    uid = os.getuid()
    for entry in os.scandir(shm_dir):
        match = _SEGMENT.match(entry.name)
        try:
            mine = match is not None and entry.stat(follow_symlinks=False).st_uid == uid
        except FileNotFoundError:  # removed meanwhile, e.g. by the run that owns it
            continue
        if mine:
            segments.setdefault(match[1], []).append(entry.name)
    if not segments:
        return []
    mapped = _mapped_segment_names(shm_dir, proc_dir)
    removed = []
    for prefix, names in sorted(segments.items()):
        if any(name in mapped for name in names):
            continue
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):  # present unless killed while starting
            Path(tempfile.gettempdir(), f"{prefix}_{lock}").touch()
        for name in names:
            try:
                (shm_dir / name).unlink()
            except FileNotFoundError:  # another rank of this node got there first
                pass
        removed.append(prefix)
    return removed


def _mapped_segment_names(shm_dir: Path, proc_dir: Path) -> set[str]:
    """Names of the files in `shm_dir` that some live process has mapped. Processes whose maps we
    may not read belong to other users, who cannot map this user's segments (mode 0600)."""
    marker = f" {shm_dir}/"
    names = set()
    for entry in os.scandir(proc_dir):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "maps"), encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find(marker)
                    if at >= 0:
                        names.add(line[at + len(marker) :].split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # exited, or not ours
            continue
    return names


# ---------------------------------------------------------------------------------------------
# Choosing a prefix without racing other processes
# ---------------------------------------------------------------------------------------------
REGISTER_ATTEMPTS = 100


def register_shm_prefix(
    streams_local: list[str], streams_remote: list[str | None], world: World, retry: int = 100
) -> tuple[int, SharedMemory]:
    """Streaming's `get_shm_prefix` (same arguments, same result) without its races (see above)."""
    _check_self(streams_local)
    prefix_int, registry, error = None, None, None
    if world.is_local_leader:
        try:
            prefix_int, registry = _register(streams_local, streams_remote, retry)
        except (ValueError, RuntimeError, OSError) as e:  # e.g. Streaming's "Reused local directory"
            error = e
    if torch_dist.is_available() and torch_dist.is_initialized():
        # One all-gather: every rank learns the prefix its node's first rank registered, or its
        # error (raised on every rank, so that none waits for a leader that gave up).
        found: list = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(found, (world.node, prefix_int, None if error is None else str(error)))
        leaders = [(p, e) for node, p, e in found if node == world.node and (p is not None or e is not None)]
        if error is None and leaders and leaders[0][1] is not None:
            error = RuntimeError(
                f"the first rank of this node could not register its dataset: {leaders[0][1]}"
            )
        elif error is None and leaders:
            prefix_int = leaders[0][0]
    if error is not None:
        raise error
    if prefix_int is None:
        raise RuntimeError(
            f"no rank of node {world.node} registered a Streaming prefix: the ranks disagree on which node "
            "is theirs (check LOCAL_WORLD_SIZE / the launcher's environment)"
        )
    if registry is None:
        registry = SharedMemory(_get_path(prefix_int, LOCALS), False)
        their_locals, their_prefix_int = _unpack_locals(bytes(registry.buf))
        if streams_local != their_locals or prefix_int != their_prefix_int:
            raise RuntimeError(
                f"Streaming shared memory prefix {prefix_int} holds {their_locals}, not this rank's "
                f"{streams_local}: every rank of a node must build its datasets with the same local folders"
            )
    return prefix_int, registry


def _register(
    streams_local: list[str], streams_remote: list[str | None], retry: int
) -> tuple[int, SharedMemory]:
    """The node's first rank: the first free prefix, created with O_EXCL (lost races probe again)."""
    for _ in range(REGISTER_ATTEMPTS):
        candidate = max(
            _check_and_find_retrying(streams_local, streams_remote, name, retry) for name in SHM_TO_CLEAN
        )
        data = _pack_locals(streams_local, candidate)
        try:
            registry = SharedMemory(_get_path(candidate, LOCALS), True, len(data))
        except FileExistsError:  # another process registered it after we probed: probe again
            continue
        registry.buf[: len(data)] = data
        return candidate, registry
    raise RuntimeError(
        f"no free Streaming shared-memory prefix after {REGISTER_ATTEMPTS} attempts: too many processes "
        "are starting datasets on this node at once"
    )


@contextlib.contextmanager
def exclusive_shm_prefix() -> Iterator[None]:
    """While building a StreamingDataset: its prefix comes from `register_shm_prefix`."""
    with compat.swapped("streaming_shm_prefix", streaming_dataset, get_shm_prefix=register_shm_prefix):
        yield
