"""Every training run a test waits for: `composer -n N train.py ...` (`run_training`) or `python train.py ...`
(`run_train_py`), each started by forking a process that has already imported their modules.

Why: on CI's 2-core machine, importing Composer costs ~6 CPU-s, and train.py's modules (Composer, torch,
transformers through torchmetrics, Streaming) ~8. A `composer -n 1 train.py ...` launch paid both before
its first batch, a `composer -n 2` launch three times, while a test's run trains for 1-3 s: imports
were most of the suite's CPU time. Here a fork server (multiprocessing's "forkserver") imports those
modules once per pytest worker, before doing any work (so no thread pool is forked), and each launcher
or 1-rank run is a fresh process forked from it. A launcher forked so starts each of its ranks by
forking itself (`_ForkedRank`), still idle, instead of exec'ing a new interpreter.

What stays real:
- Each run is its own process with its own signal handlers, logging, process group, stdout/stderr
  and exit code. It runs the program's own entry point (Composer's `launcher.main`, train.py's `main`)
  and ends as the interpreter ends a process: threads joined, atexit handlers run.
- `composer -n 2` is Composer's launcher, its code unchanged: it gives each rank its environment and
  output files, watches them, stops the others when one fails. Each rank is its child, in its process
  group, and runs train.py's `main`.
- A 1-rank run skips the launcher process. Its rank gets the environment Composer's launcher gives
  rank 0 (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port, ...).
- Runs that a test signals are started from scratch as subprocesses: `start` in
  tests/training/test_resume_e2e.py and the launches in tests/faults. test_config_error_is_one_clear_line
  runs the literal `python train.py`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.run_env import run_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
LAUNCHER = (sys.executable, "-m", "composer.cli.launcher")

# What the runs import, once, in the fork server (train.py's modules include Composer's).
PRELOAD = ["dbrx_train.training.train", "composer.cli.launcher"]

_context: multiprocessing.context.ForkServerContext | None = None
# weakref.finalize cleanups that exist in the fork server after its imports (an exec'd process
# registers the same): a forked rank keeps these and drops those its launcher registered since.
_PRELOADED_FINALIZERS: set = set()


def run_training(
    nproc: int,
    args: list[str],
    *,
    cwd: Path | str = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    launcher_args: tuple[str, ...] = (),
    preexec_fn: Callable[[], object] | None = None,
    one_stream: bool = False,
) -> subprocess.CompletedProcess:
    """`composer -n nproc [launcher_args] train.py args`, as subprocess.run(capture_output=True, text=True)
    returns it (a run past `timeout` raises subprocess.TimeoutExpired). `preexec_fn` runs in the new
    process first, as subprocess's does (a launcher's ranks inherit what it sets); it must pickle
    (functools.partial, not a lambda). `one_stream`: stderr goes to stdout, interleaved as a terminal
    shows them (stderr=subprocess.STDOUT)."""
    env = run_env(nproc) if env is None else env
    launcher_argv = ["-n", str(nproc), *launcher_args, str(TRAIN_PY), *args]
    cmd = ["composer", *launcher_argv]  # what the run stands for, in errors
    forked = dict(cwd=Path(cwd), timeout=timeout, preexec_fn=preexec_fn, one_stream=one_stream)
    if nproc == 1 and not launcher_args:
        return _forked(cmd, "train.py", args, env=_rank_zero_env(env), **forked)
    return _forked(cmd, "composer", launcher_argv, env=env, **forked)


def _rank_zero_env(env: dict[str, str]) -> dict[str, str]:
    """`env` plus what composer/cli/launcher.py sets for the rank it starts in a 1-rank run."""
    from composer.utils import get_free_tcp_port

    return {
        **env,
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


def run_train_py(
    args: list[str], *, cwd: Path | str = ROOT, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python train.py args`: no launcher, so no distributed environment variables."""
    cmd = ["python", str(TRAIN_PY), *args]
    env = run_env(1) if env is None else env
    return _forked(
        cmd, "train.py", args, cwd=Path(cwd), env=env, timeout=timeout, preexec_fn=None, one_stream=False
    )


def _fork_server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _forked(
    cmd: list[str],
    program: str,
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    preexec_fn: Callable[[], object] | None,
    one_stream: bool,
) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="forked-run-") as logs:
        out = Path(logs, "stdout")
        err = out if one_stream else Path(logs, "stderr")
        proc = _fork_server().Process(
            target=_run_program, args=(program, args, str(cwd), env, str(out), str(err), preexec_fn)
        )
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            _kill_tree(proc.pid)
            proc.join()
            raise subprocess.TimeoutExpired(
                cmd, timeout, output=_read(out), stderr=None if one_stream else _read(err)
            )
        return subprocess.CompletedProcess(cmd, proc.exitcode, _read(out), None if one_stream else _read(err))


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


def _run_program(
    program: str,
    args: list[str],
    cwd: str,
    env: dict[str, str],
    stdout: str,
    stderr: str,
    preexec_fn: Callable[[], object] | None,
) -> None:
    """The forked process: `program args` as the interpreter runs it (`composer` = Composer's launcher,
    `train.py`), then exit with its status."""
    _PRELOADED_FINALIZERS.update(weakref.finalize._registry)  # type: ignore[attr-defined]
    if preexec_fn is not None:
        preexec_fn()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    target = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, 1)
    if stderr != stdout:
        os.close(target)
        target = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, 2)
    os.close(target)
    # unbuffered, as PYTHONUNBUFFERED=1 (run_env, and the launcher's ranks) has it
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    if program == "composer":
        from composer.cli import launcher

        # Its ranks are forked from this process too (_ForkedRank), which has done no work yet.
        launcher.subprocess = _LauncherSubprocess()
    os._exit(_run_main(program, args))


def _run_main(program: str, args: list[str]) -> int:
    """`program`'s entry point with `args`, then the interpreter's shutdown: its exit status."""
    import torch

    # OpenMP read OMP_NUM_THREADS when the fork server imported torch: this process's share of the cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if program == "composer":
        from composer.cli import launcher

        sys.argv = [launcher.__file__, *args]
        entry = launcher.main
    else:
        from dbrx_train.training.train import main

        sys.argv = [str(TRAIN_PY), *args]
        entry = main
    code = 0
    try:
        result = entry()
        code = result if isinstance(result, int) else 0  # the launcher returns its exit status
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
    return code


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


class _ForkedRank(subprocess.Popen):
    """How a forked Composer launcher starts its ranks: `python train.py ...` runs as a fork of the
    launcher process (train.py's modules imported, no work done yet, no threads), everything else as
    usual. The rank is still the launcher's child, in its process group, with the stdin, stdout and
    stderr and the environment the launcher gave it; poll, wait and signals are Popen's own."""

    def _execute_child(
        self,
        args,
        executable,
        preexec_fn,
        close_fds,
        pass_fds,
        cwd,
        env,
        startupinfo,
        creationflags,
        shell,
        p2cread,
        p2cwrite,
        c2pread,
        c2pwrite,
        errread,
        errwrite,
        restore_signals,
        gid,
        gids,
        uid,
        umask,
        start_new_session,
        process_group,
    ):
        argv = [str(a) for a in args] if not isinstance(args, (str, bytes)) else []
        plain = not shell and preexec_fn is None and cwd is None and not start_new_session
        if not (plain and argv[:2] == [sys.executable, str(TRAIN_PY)]):
            return super()._execute_child(
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags,
                shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, restore_signals, gid, gids,
                uid, umask, start_new_session, process_group,
            )  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, source in ((0, p2cread), (1, c2pwrite), (2, errwrite)):
                    if source not in (-1, fd):
                        os.dup2(source, fd)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                # The launcher's own cleanups (its log folder's) are not the rank's to run at its exit.
                for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
                    if finalizer not in _PRELOADED_FINALIZERS:
                        finalizer.detach()
                code = _run_main("train.py", argv[2:])
            finally:
                os._exit(code)
        self.pid = pid
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


class _LauncherSubprocess:
    """`subprocess` as composer/cli/launcher.py sees it in a forked launcher: Popen is _ForkedRank."""

    Popen = _ForkedRank

    def __getattr__(self, name: str):
        return getattr(subprocess, name)
