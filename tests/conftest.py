"""Shared fixtures: the embedded default corpus, built once per session from Python's own text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory) -> Path:
    """`data/default`'s layout (prose/code x train/val MDS) at 64 tokens per sample, code capped."""
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
