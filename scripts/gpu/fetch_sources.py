"""Download the [gpu] extra's source distributions into .whl/ for a GPU machine without network.

MegaBlocks and grouped_gemm compile CUDA code at install time, against the torch they find, so they
travel as sdists and are built on the GPU machine (scripts/gpu/device_check.sh). Run this where
PyPI is reachable; each file is checked against the sha256 that PyPI publishes for it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from pathlib import Path

# The versions pyproject.toml's [gpu] extra pins (stanford-stk is megablocks' own pin).
SOURCES = [("stanford-stk", "0.7.1"), ("grouped_gemm", "0.3.0"), ("megablocks", "0.10.0")]


def fetch(name: str, version: str, dest: Path) -> Path:
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as response:
        files = json.load(response)["releases"].get(version, [])
    sdist = next((f for f in files if f["packagetype"] == "sdist"), None)
    if sdist is None:
        raise SystemExit(f"{name}=={version}: PyPI lists no source distribution")
    path = dest / sdist["filename"]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
        with urllib.request.urlopen(sdist["url"], timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
            raise SystemExit(f"{sdist['filename']}: sha256 differs from PyPI's; not saved")
        path.write_bytes(data)
    return path


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".whl")
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in SOURCES:
        path = fetch(name, version, dest)
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, sha256 verified)")


if __name__ == "__main__":
    main()
