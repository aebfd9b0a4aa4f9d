"""One run per run folder: the lock names a live holder, is taken over from a dead one, and is shared by
the ranks of one run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dbrx_train.checkpoint.run_lock import LOCK_FILE, RunLockError, acquire

HOLD = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "here", "started": "now", "run_id": "other"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            RunLockError, match=f"in use by another run \\(pid {holder.pid} on here, started now"
        ):
            acquire(tmp_path, "mine")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder died without removing its record (as a SIGKILLed run does): taken over, with a notice.
    lock, notice = acquire(tmp_path, "mine")
    assert notice is not None and f"pid {holder.pid}" in notice and "no longer running" in notice
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (
        record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["run_id"] == "mine"
    )
    # Another node of the same run shares it; another run is refused, naming this process.
    shared, _ = acquire(tmp_path, "mine")
    assert shared.fd is None
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        acquire(tmp_path, "theirs")
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves no holder to report
    again, notice = acquire(tmp_path, "theirs")
    assert notice is None
    again.release()
