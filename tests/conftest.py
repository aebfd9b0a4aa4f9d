"""Shared fixtures: the embedded default corpus, built once per session from Python's own text; small disks."""

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
