"""One run per run folder: `run.lock`, held for the whole run, naming its holder (PID, host, start time).

Two runs in one folder delete each other's unfinished saves, write every batch twice into
metrics.jsonl and mix their checkpoints, so a second run is refused before it touches anything.

The lock is an exclusive `flock` on `{save_folder}/run.lock`, taken by the local rank 0 of every
node and held until the process exits: the kernel drops it when the holder dies, however it dies
(SIGKILL, OOM, a reboot), so a dead run never blocks the next one. The file's content (PID, the
kernel's start time of that PID, host, start time, command, and a run id every rank of one run
shares) names the holder in the refusal; a run that finds the content of a holder that no longer
holds the lock says that it took it over.

Across hosts, a shared filesystem decides what the lock sees: NFSv4, Lustre mounted with `flock`,
GPFS and BeeGFS pass flock between hosts, so a run on another node is refused as on one host;
filesystems that keep locks per host (NFS without lockd, many FUSE mounts) do not, and there two
runs on two hosts are not stopped (docs/reliability.md). Every node of one run shares its rank 0's
lock through the run id.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from composer.utils import dist

LOCK_FILE = "run.lock"


class RunLockError(RuntimeError):
    """The run folder is held by another run; the message names the holder."""


@dataclass
class RunLock:
    path: Path
    run_id: str
    fd: int | None  # the open, flocked file; None when this node shares another process's lock

    def release(self) -> None:
        """Empty the file (so the next run has no holder to report), then drop the lock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot; Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count the fields after its last ')'.
    return stat.rsplit(")", 1)[-1].split()[19]


def describe(holder: dict) -> str:
    command = f", {holder['command']}" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}{command}"


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire(run_folder: Path, run_id: str) -> tuple[RunLock, str | None]:
    """Lock the run folder for this run (or share the lock of this run's rank 0: same run id).

    Returns the lock and, when a dead run's holder record was found, a notice naming it. Raises
    RunLockError naming the holder when another live run has the folder.
    """
    run_folder.mkdir(parents=True, exist_ok=True)
    path = run_folder / LOCK_FILE
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path.read_text(errors="replace"))
            os.close(fd)
            if holder.get("run_id") == run_id:
                return RunLock(path, run_id, None), None
            raise RunLockError(
                f"save_folder {run_folder} is in use by another run ({describe(holder)}): wait for it to finish "
                f"or stop it, or choose another save_folder/run_name"
            ) from None
        # Locked: but if the file was replaced or removed meanwhile, this lock guards nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _holder(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if (
            previous.get("run_id") == run_id
        ):  # another node of this run, on a filesystem that keeps locks per host
            os.close(fd)
            return RunLock(path, run_id, None), None
        record = {
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "run_id": run_id,
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        notice = None
        if previous:
            notice = f"took over {path} from a run that is no longer running ({describe(previous)})"
        return RunLock(path, run_id, fd), notice
    raise RunLockError(f"could not lock {path}: it keeps being replaced by another process")


def lock_run_folder(run_folder: Path) -> RunLock:
    """Rank 0 takes the lock, then each other node's first rank takes (or shares) it; every rank raises
    RunLockError if any of them could not. Prints a notice when a dead run's lock was taken over."""
    box = [uuid.uuid4().hex]
    dist.broadcast_object_list(box, src=0)
    run_id = box[0]
    lock, error, notice = None, None, None
    first_of_node = dist.get_local_rank() == 0

    def attempt() -> None:
        nonlocal lock, error, notice
        try:
            lock, notice = acquire(run_folder, run_id)
        except RunLockError as e:
            error = str(e)
        except OSError as e:
            error = f"save_folder {run_folder} cannot be written ({e.strerror or e}): choose a writable save_folder"

    if dist.get_global_rank() == 0:
        attempt()
    box = [error]
    dist.broadcast_object_list(box, src=0)  # the other nodes look only once rank 0 holds it
    if box[0] is None and first_of_node and dist.get_global_rank() != 0:
        attempt()
    errors = [e for e in dist.all_gather_object(box[0] or error) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise RunLockError(errors[0])
    if notice:
        print(f"dbrx-train: {notice}", flush=True)
    return lock or RunLock(run_folder / LOCK_FILE, run_id, None)
