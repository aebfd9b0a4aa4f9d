"""Running one fault case and judging what the user saw.

Each case prepares its files (copies of the shared world), names the files that must survive it,
runs one real tool (in this process, or as a `composer` launch for signals and several ranks), and
is judged on five outcomes, worst first:

    hang       it did not finish within the case's time limit
    lost       a file that existed before (a checkpoint, a dataset, an export) changed or vanished
    traceback  a Python traceback reached the user
    silent     the wrong exit code, or no single line naming the thing (or that line not last)
    clean      the expected exit code and one line, once, naming the file/key/stream
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.world import World, script_main

# What Composer's launcher prints around the ranks' own output (not the run's words).
LAUNCHER_LINE = re.compile(
    r"^((ERROR|WARNING|INFO):(__main__|composer\.cli\.launcher):|Global rank \d|Waiting up to \d|----------"
    r"|Killing training processes|Ctrl-C received|wandb:|\s*$)"
)


@dataclass
class Act:
    """What a case runs: `tool` with `args` (in this process), or `launch` (a subprocess it drives)."""

    tool: str = ""
    args: list[str] = field(default_factory=list)
    keep: list[Path] = field(default_factory=list)  # files (or folders of files) whose bytes must survive
    launch: Callable[[], tuple[int, str]] | None = None  # -> (exit code, everything the user saw)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = (
        None  # where the tool runs (runs/{run_name} of an object-store save_folder lands there)
    )
    timeout: int = 300
    post: Callable[[], str | None] | None = None  # a further check afterwards: what is wrong, or None
    finish: Callable[[], None] | None = None  # undo what setup did outside tmp (a mount, a held lock)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # data | config | checkpoint | signal | concurrent | disk | hf | prep
    setup: Callable[[World, Path], Act]
    code: int  # the exit code the user must get
    says: tuple[str, ...]  # what the one line must contain (the first fragment finds the line)
    slow: bool = False  # a subprocess launch


@dataclass
class Verdict:
    outcome: str
    detail: str


class Hang(BaseException):
    """The case ran past its time limit (raised by SIGALRM in this process)."""


def _tools() -> dict[str, Callable[[list[str]], object]]:
    from dbrx_train.training.train import main as train

    return {
        "train": train,
        "convert": script_main("scripts/convert_to_hf.py"),
        "generate": script_main("scripts/generate.py"),
        "stats": script_main("scripts/model_stats.py"),
        "prep_text": script_main("data_prep/convert_text_to_mds.py"),
        "prep_chat": script_main("data_prep/convert_finetuning_dataset.py"),
        "corpus": script_main("data_prep/build_default_corpus.py"),
    }


TOOLS: dict[str, Callable[[list[str]], object]] = {}


def snapshot(paths: list[Path]) -> dict[str, set[str]]:
    """sha256 of every file under `paths`, by path; a checkpoint moved aside (`<name>.corrupt`, or
    `<name>.replaced-<id>` when its name is committed again) still counts as the same files."""
    found: dict[str, set[str]] = {}
    for top in paths:
        aside = [*top.parent.glob(f"{top.name}.corrupt*"), *top.parent.glob(f"{top.name}.replaced-*")]
        files = (
            [top]
            if top.is_file()
            else [p for folder in (top, *aside) for p in folder.rglob("*") if p.is_file()]
        )
        for path in files:
            if path.name in ("run.lock", "rejected.txt"):
                continue
            key = re.sub(r"\.(corrupt(-[0-9a-f]{8})?|replaced-[0-9a-f]{8})(?=/|$)", "", str(path))
            found.setdefault(key, set()).add(hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def missing_bytes(before: dict[str, set[str]], after: dict[str, set[str]]) -> list[str]:
    return [key for key, hashes in before.items() if not hashes <= after.get(key, set())]


def run_in_process(tool: str, args: list[str], timeout: int, capfd) -> tuple[object, str, str | None]:
    """(exit code, output, traceback or None) of `tool`'s main(args) in this process."""
    if not TOOLS:
        TOOLS.update(_tools())
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def too_long(signum, frame):
        raise Hang

    previous_alarm = signal.signal(signal.SIGALRM, too_long)
    # What train.py logs reaches the user's terminal (pytest would keep it to itself).
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("dbrx_train")
    logger.addHandler(shown)
    signal.alarm(timeout)
    code: object = 0
    error = None
    try:
        TOOLS[tool](args)
    except SystemExit as e:
        if isinstance(e.code, str):  # `raise SystemExit("error: ...")`: Python prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except Hang:
        code = "hang"
    except BaseException:
        error = traceback.format_exc()
    finally:
        signal.alarm(0)
        logger.removeHandler(shown)
        signal.signal(signal.SIGALRM, previous_alarm)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    captured = capfd.readouterr()
    return code, captured.out + captured.err, error


def judge(case: Case, act: Act, code: object, output: str, error: str | None, lost: list[str]) -> Verdict:
    if code == "hang":
        return Verdict("hang", f"no exit within {act.timeout} s")
    if lost:
        return Verdict("lost", f"changed or gone: {lost[:3]}")
    if error is not None or "Traceback (most recent call last)" in output:
        return Verdict("traceback", error or output[-3000:])
    if act.post is not None and (problem := act.post()) is not None:
        return Verdict("silent", problem)
    if code != case.code:
        return Verdict("silent", f"exit code {code}, expected {case.code}:\n{output[-3000:]}")
    lines = [line for line in output.splitlines() if case.says[0] in line]
    if len(lines) != 1:
        return Verdict("silent", f"{len(lines)} lines contain {case.says[0]!r}:\n{output[-3000:]}")
    [line] = lines
    missing = [fragment for fragment in case.says if fragment not in line]
    if missing:
        return Verdict("silent", f"the line lacks {missing}: {line}")
    if case.code != 0:
        shown = [s for s in output.splitlines() if not LAUNCHER_LINE.match(s)]
        if not shown or shown[-1] != line:
            return Verdict("silent", f"the error is not the last line the user sees: {shown[-3:]}")
    return Verdict("clean", line)


def run_case(case: Case, world: World, tmp: Path, capfd) -> Verdict:
    act = case.setup(world, tmp)
    saved_env = {key: os.environ.get(key) for key in act.env}
    os.environ.update(act.env)
    before = snapshot(act.keep)
    cwd = os.getcwd()
    if act.cwd is not None:
        os.chdir(act.cwd)
    try:
        if act.launch is not None:
            try:
                code, output = act.launch()
            except subprocess.TimeoutExpired as e:
                code, output = "hang", f"{e}"
            error = None
        else:
            code, output, error = run_in_process(act.tool, act.args, act.timeout, capfd)
    finally:
        os.chdir(cwd)
        for key, value in saved_env.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    try:
        return judge(case, act, code, output, error, missing_bytes(before, snapshot(act.keep)))
    finally:
        if act.finish is not None:
            act.finish()
