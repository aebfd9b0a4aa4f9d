"""How a run ends on an error: one line, once, from the rank that found it, and then the exit code.

Under Composer's launcher the first rank to exit sets the job's exit status; the launcher then
SIGTERMs the others, and at the end prints the whole captured log of every rank (but a node's
first) that exited with an error code of its own. So:

- an error every rank reached together (a refusal before training: the run folder, the start
  checkpoint, the disk; a failed HF export) is printed by rank 0; each node's first rank exits with
  the code, the others wait for the launcher's SIGTERM, so no log is dumped after the line;
- an error one rank found on its own (a bad sample, a failed save) is printed by that rank, which
  exits with the code (the launcher ends its output with that rank's log, ending with the line);
- a rank whose collective failed because another rank died (gloo's "Connection closed by peer")
  prints nothing: the rank that died has said why.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import NoReturn

from composer.utils import dist

LAUNCHER_GRACE_S = 30.0  # how long a rank that is not a node's first waits for the launcher's SIGTERM
# What gloo (and NCCL) say when the process at the other end of a collective is gone.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


def is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another rank exited (that rank reports its own error)."""
    text = str(error)
    return dist.get_world_size() > 1 and isinstance(error, RuntimeError) and any(m in text for m in PEER_GONE)


def leave(code: int, *, after_first_rank: bool) -> NoReturn:
    """Exit with `code`; with `after_first_rank`, a rank that is not its node's first lets that one exit first
    (the launcher then SIGTERMs this one, which does not dump its log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    waits = after_first_rank and dist.get_world_size() > 1 and dist.get_local_rank() != 0
    if threading.current_thread() is threading.main_thread():
        # A rank that exits with its code ignores the SIGTERM the launcher sends once another rank is gone:
        # arriving during interpreter shutdown it would turn the code into -15 (and hide this rank's log).
        signal.signal(signal.SIGTERM, signal.SIG_DFL if waits else signal.SIG_IGN)
    if waits:
        time.sleep(LAUNCHER_GRACE_S)
    raise SystemExit(code)


def end_run(message: str, code: int, *, collective: bool) -> NoReturn:
    """Print `dbrx-train: <message>` (rank 0 only when every rank has the same error) and exit with `code`."""
    if not collective or dist.get_global_rank() == 0:
        print(f"dbrx-train: {message}", file=sys.stderr, flush=True)
    leave(code, after_first_rank=collective)


def end_after_peer_failure() -> NoReturn:
    """Another rank died and said why: exit without adding noise."""
    leave(1, after_first_rank=True)
