"""Shared fixtures: the embedded default corpus, built once per session from Python's own text (at DBRX's
vocabulary, and folded to a small one for the tests of training mechanics); small disks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.faults.outcomes import FAULT_OUTCOME, OUTCOMES
from tests.run_env import threads_per_rank
from tests.small_vocab import fold_corpus

ROOT = Path(__file__).resolve().parents[1]

# torch.compile in this process and in every run the tests start: compile in the process itself. On
# 2 cores a pool of compile workers (each importing torch) costs more than it saves: a 2-rank compiled
# run took 59 s of CPU instead of 87 s.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# Under pytest-xdist (`make test`), each worker and every process it starts get the worker's share of
# the cores (tests/run_env.py): two workers each running torch on every core only thrash.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(1)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest test files, longest first (`pytest --durations=0`, summed per file). `make test` hands whole
# files to its xdist workers in collection order (--no-loadscope-reorder): a long file handed out last
# would run alone at the end while the other worker idles.
LONGEST_FILES = [  # seconds summed per file, 2026-11-30, 2 workers on the 2-core machine
    "tests/training/test_resume_e2e.py",  # 161
    "tests/bad_inputs/test_bad_data.py",  # 87
    "tests/training/test_hf_export.py",  # 60
    "tests/faults/test_fault_suite.py",  # 54
    "tests/training/test_pretrained_shards.py",  # 43
    "tests/training/test_lora_e2e.py",  # 42
    "tests/data/test_streaming_shm.py",  # 42
    "tests/eval/test_lm_eval_parity.py",  # 41
    "tests/training/test_icl_e2e.py",  # 37
    "tests/training/test_expert_parallel.py",  # 34
    "tests/training/test_train_e2e.py",  # 33
    "tests/data/test_prepare.py",  # 18
    "tests/training/test_lora_fsdp.py",  # 14
    "tests/data/test_finetuning.py",  # 14
    "tests/training/test_fsdp_gloo.py",  # 13
]


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.relative_to(ROOT).as_posix(), len(order)))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test session: under pytest-xdist the workers share the first one's
    result (every worker's temp folder sits inside the session's), the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    out = root / "built-once" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.with_name(f"{name}.done")
    with FileLock(str(out.with_name(f"{name}.lock"))):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half-way
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def real_vocab_corpus(tmp_path_factory) -> Path:
    """`data/default` as `make data` builds it (DBRX's tokenizer), at 64 tokens per sample, code capped.
    For tests that fine-tune, tokenize or generate text; they also set DBRX's `model.vocab_size`."""

    def build(out: Path) -> None:
        cmd = [
            sys.executable,
            str(ROOT / "data_prep/build_default_corpus.py"),
            "--out",
            str(out),
            "--max-seq-len",
            "64",
            "--max-code-tokens",
            "300000",
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)

    return built_once(tmp_path_factory, "default", build)


@pytest.fixture(scope="session")
def default_corpus(real_vocab_corpus, tmp_path_factory) -> Path:
    """`real_vocab_corpus` with its pretraining token ids folded below SMALL_VOCAB, which
    test_train_e2e.SMALL sets as `model.vocab_size`: runs and checkpoints ~20x smaller
    (tests/small_vocab.py says how, and what must keep the real vocabulary)."""
    return built_once(tmp_path_factory, "small_vocab", lambda out: fold_corpus(real_vocab_corpus, out))


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_mib) -> a folder on a tmpfs of that size: a real small disk (ENOSPC included)."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        point = tmp_path / f"disk-{size_mib}m"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a {size_mib} MiB tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


# The fault suite's tally (tests/faults), printed after the session: how many cases ended each way. Each
# case records its outcome as a user property of its report; the hooks live here, in the conftest the
# process printing the summary always loads (under pytest-xdist that process collects no tests).
_fault_outcomes: dict[str, str] = {}  # case name -> outcome


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == FAULT_OUTCOME:
            name, outcome = value
            _fault_outcomes[name] = outcome


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _fault_outcomes:
        counts = ", ".join(f"{o} {sum(1 for v in _fault_outcomes.values() if v == o)}" for o in OUTCOMES)
        terminalreporter.write_line(f"fault suite: {len(_fault_outcomes)} cases: {counts}")
