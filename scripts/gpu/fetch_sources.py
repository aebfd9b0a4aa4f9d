"""Download what the GPU check carries into .whl/, for a GPU machine without network.

- The [gpu] extra as source distributions: MegaBlocks and grouped_gemm compile CUDA code at install
  time, against the torch they find, so they are built on the GPU machine (device_check.sh).
- transformers 4.57 (the version this project supports and exports for) with the tokenizers and
  huggingface_hub it accepts, as wheels: the GPU image has transformers 5, and bench_gpu compares
  against the DbrxForCausalLM our users run.
Run this where PyPI is reachable; each file is checked against the sha256 that PyPI publishes for it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

# The versions pyproject.toml's [gpu] extra pins (stanford-stk is megablocks' own pin).
SOURCES = [("stanford-stk", "0.7.1"), ("grouped_gemm", "0.3.0"), ("megablocks", "0.10.0")]
# transformers as pinned in pyproject.toml, and versions of its runtime-checked dependencies that it
# accepts (the GPU image's are too new for it); wheels for Python 3.12 on x86-64 Linux.
WHEELS = [("transformers", "4.57.6"), ("tokenizers", "0.22.2"), ("huggingface_hub", "0.36.2")]


def wanted(entry: dict, kind: str) -> bool:
    if kind == "sdist":
        return entry["packagetype"] == "sdist"
    name = entry["filename"]
    return entry["packagetype"] == "bdist_wheel" and (
        name.endswith("-none-any.whl")
        or ("manylinux" in name and name.endswith("_x86_64.whl") and "abi3" in name)
    )


def fetch(name: str, version: str, dest: Path, kind: str = "sdist") -> Path:
    index = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        files = json.load(response)["releases"].get(version, [])
    entry = next((f for f in files if wanted(f, kind)), None)
    if entry is None:
        raise SystemExit(f"{name}=={version}: PyPI lists no {kind} for Python 3.12 on x86-64 Linux")
    path = dest / entry["filename"]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["digests"]["sha256"]:
        # Mirrors of the index may give the file's address relative to the JSON page.
        with urllib.request.urlopen(urllib.parse.urljoin(index, entry["url"]), timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != entry["digests"]["sha256"]:
            raise SystemExit(f"{entry['filename']}: sha256 differs from PyPI's; not saved")
        path.write_bytes(data)
    return path


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".whl")
    dest.mkdir(parents=True, exist_ok=True)
    for (name, version), kind in [(s, "sdist") for s in SOURCES] + [(w, "wheel") for w in WHEELS]:
        path = fetch(name, version, dest, kind)
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, sha256 verified)")


if __name__ == "__main__":
    main()
