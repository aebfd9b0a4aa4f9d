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

The lock files stay (empty files; Streaming leaves them behind for every prefix it ever used).
They keep the prefix taken: each rank of a job picks its prefix on its own, skipping prefixes
with lock files or segments, so freeing a prefix while the ranks of a running job are picking
one could make them pick different ones (Streaming then stops with "shared memory registered
does not match local leader").
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

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
