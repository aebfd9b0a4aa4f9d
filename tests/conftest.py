"""Shared fixtures: the embedded default corpus, built once per session from Python's own text (at DBRX's
vocabulary, and folded to a small one for the tests of training mechanics); small disks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.small_vocab import fold_corpus

ROOT = Path(__file__).resolve().parents[1]

# torch.compile in this process and in every run the tests start: compile in the process itself. On
# 2 cores a pool of compile workers (each importing torch) costs more than it saves: a 2-rank compiled
# run took 59 s of CPU instead of 87 s.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def real_vocab_corpus(tmp_path_factory) -> Path:
    """`data/default` as `make data` builds it (DBRX's tokenizer), at 64 tokens per sample, code capped.
    For tests that fine-tune, tokenize or generate text; they also set DBRX's `model.vocab_size`."""
    out = tmp_path_factory.mktemp("corpus") / "default"
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
    return out


@pytest.fixture(scope="session")
def default_corpus(real_vocab_corpus, tmp_path_factory) -> Path:
    """`real_vocab_corpus` with its pretraining token ids folded below SMALL_VOCAB, which
    test_train_e2e.SMALL sets as `model.vocab_size`: runs and checkpoints ~20x smaller
    (tests/small_vocab.py says how, and what must keep the real vocabulary)."""
    return fold_corpus(real_vocab_corpus, tmp_path_factory.mktemp("corpus") / "small_vocab")


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
