"""Every training run a test starts: `composer -n N train.py ...` (`run_training`) or `python train.py ...`
(`run_train_py`), with the 1-process runs forked instead of started from scratch.

Why the fork: on CI's 2-core machine a `composer -n 1 train.py ...` launch spent ~14 CPU-s before its
first batch (Composer imported by the launcher, then Composer, torch, transformers and Streaming by
the rank), while a test's run trains for 1-3 s; such launches were about a third of the suite's CPU.
Here a fork server (multiprocessing's "forkserver") imports train.py's modules once per pytest worker,
before doing any work (no thread pool is forked), and each 1-process run is a fresh process forked
from it.

What stays real: each run is its own process that runs train.py's `main` with its own signal handlers,
logging, process group, stdout/stderr and exit code, and ends as the interpreter ends a process
(threads joined, atexit handlers run). A 1-rank run gets the environment Composer's launcher gives
rank 0 (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port, ...). What is skipped is
the launcher process itself: every multi-rank run and every run a test signals still goes through it
(`nproc > 1` or `launcher_args` here; `start` in tests/training/test_resume_e2e.py; tests/faults), and
test_config_error_is_one_clear_line runs the literal `python train.py`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.run_env import run_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
LAUNCHER = (sys.executable, "-m", "composer.cli.launcher")

# What every run imports: imported once, in the fork server.
PRELOAD = ["dbrx_train.training.train"]

_context: multiprocessing.context.ForkServerContext | None = None


def run_training(
    nproc: int,
    args: list[str],
    *,
    cwd: Path | str = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    launcher_args: tuple[str, ...] = (),
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess:
    """`composer -n nproc [launcher_args] train.py args`, as subprocess.run(capture_output=True, text=True)
    returns it (a run past `timeout` raises subprocess.TimeoutExpired). `preexec_fn` runs in the new
    process before training, as subprocess's does; for a forked run it must pickle (functools.partial)."""
    env = run_env(nproc) if env is None else env
    if nproc == 1 and not launcher_args:
        return _forked_rank_zero(args, cwd=Path(cwd), env=env, timeout=timeout, preexec_fn=preexec_fn)
    cmd = [*LAUNCHER, "-n", str(nproc), *launcher_args, str(TRAIN_PY), *args]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn
    )


def _fork_server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def run_train_py(
    args: list[str], *, cwd: Path | str = ROOT, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python train.py args` (no launcher: no distributed environment variables), forked likewise."""
    cmd = ["python", str(TRAIN_PY), *args]
    env = run_env(1) if env is None else env
    return _forked(cmd, args, cwd=Path(cwd), env=env, timeout=timeout, preexec_fn=None)


def _forked_rank_zero(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    preexec_fn: Callable[[], object] | None,
):
    from composer.utils import get_free_tcp_port

    rank_env = {
        **env,
        # what composer/cli/launcher.py sets for each rank it starts
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(get_free_tcp_port()),
        "PYTHONUNBUFFERED": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    cmd = ["composer", "-n", "1", str(TRAIN_PY), *args]  # what the run stands for, in error messages
    return _forked(cmd, args, cwd=cwd, env=rank_env, timeout=timeout, preexec_fn=preexec_fn)


def _forked(
    cmd: list[str],
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    preexec_fn: Callable[[], object] | None,
) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="forked-run-") as logs:
        out, err = Path(logs, "stdout"), Path(logs, "stderr")
        proc = _fork_server().Process(
            target=_train_py, args=(args, str(cwd), env, str(out), str(err), preexec_fn)
        )
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            _kill_tree(proc.pid)
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, output=_read(out), stderr=_read(err))
        return subprocess.CompletedProcess(cmd, proc.exitcode, _read(out), _read(err))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _train_py(
    args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str, preexec_fn: Callable | None
) -> None:
    """The forked process: train.py's `main(args)` as `python train.py args` runs it, then exit."""
    if preexec_fn is not None:
        preexec_fn()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)  # PYTHONUNBUFFERED, as a rank has it
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    sys.argv = [str(TRAIN_PY), *args]

    import torch

    # OpenMP read OMP_NUM_THREADS when the fork server imported torch: this run's share of the cores
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    from dbrx_train.training.train import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = _exit_status(e.code)
    except BaseException:  # an uncaught exception: printed as the interpreter prints it, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    # the interpreter's shutdown: join non-daemon threads, run atexit handlers, flush
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
