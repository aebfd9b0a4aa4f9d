"""Fine-tuning straight from files, as LLM Foundry does it: `dataset.hf_name` names local .jsonl /
.parquet files, tokenized when the run starts, with no separate prep step.

    train_loader:
      name: finetuning
      dataset:
        hf_name: data/dolly            # a file, or a folder: train-*.parquet, test.jsonl, data/train/...
        split: train                   # the files named after the split (HF's convention)
        # hf_kwargs: {data_files: {train: chats/*.jsonl}}
        packing_ratio: auto

The rows go through the same conversion as data_prep/convert_finetuning_dataset.py
(`convert_conversations`), into an MDS folder under the cache (`dataset.cache_dir`, default
~/.cache/dbrx-train/finetuning/<key>). The key hashes each file's path, size and modification
time, the options that change the samples and the conversion code itself, so a changed file,
option or converter makes a new folder and an unchanged one is reused. On each node local rank 0
tokenizes (into a temporary folder, renamed when complete); the other local ranks wait for it,
and if it fails they stop with its error (a bad row's file:line). The MDS folder is then read by
the usual fine-tuning loader.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import dbrx_train.data.chat
import dbrx_train.data.finetuning
import dbrx_train.data.tokenizer
from dbrx_train.data.finetuning import (
    CONVERSATION_SUFFIXES,
    BadRow,
    FinetuningDatasetConfig,
    FinetuningLoaderConfig,
    convert_conversations,
    iter_file_conversations,
)

BUILDERS = ("json", "parquet")  # LLM Foundry's `hf_name: json` + hf_kwargs.data_files / data_dir
PREP_COMMAND = (
    "python data_prep/convert_finetuning_dataset.py --input FILES.jsonl --out data/chat/train --max-seq-len N"
)
WAIT_FOR_BUILDER_S = 120.0  # how long a waiting rank gives local rank 0 to start tokenizing


class FileDataError(ValueError):
    """hf_name files that cannot be found or read; the message names the key and what to do."""


def find_files(dataset: FinetuningDatasetConfig, key: str) -> list[Path]:
    """The files `hf_name` (+ hf_kwargs, split) names, as LLM Foundry's `datasets.load_dataset` would
    find them on disk; sorted."""
    name, kwargs, split = dataset.hf_name, dataset.hf_kwargs, dataset.split
    assert name is not None
    if name in BUILDERS:
        if kwargs.data_dir is None and kwargs.data_files is None:
            raise FileDataError(f"{key}.hf_name: {name} needs {key}.hf_kwargs.data_files or data_dir")
        root = Path(kwargs.data_dir or ".")
    else:
        root = Path(name)
        if not root.exists():
            raise FileDataError(
                f"{key}.hf_name {name!r} is not a local file or folder"
                + (
                    "; it looks like a Hugging Face Hub dataset id, and nothing is downloaded here. "
                    "Download its files where the hub is reachable and point hf_name at the folder, or "
                    f"prepare MDS once: `{PREP_COMMAND}` and set {key}.dataset.local"
                    if "/" in name and not name.startswith(("/", "."))
                    else ""
                )
            )
        if root.is_file():
            return [root]
        root = root / kwargs.data_dir if kwargs.data_dir else root
    files = (
        _data_files(root, kwargs.data_files, split, key)
        if kwargs.data_files
        else split_files(root, split, key)
    )
    bad = [p for p in files if p.suffix not in CONVERSATION_SUFFIXES]
    if bad:
        raise FileDataError(f"{key}: {bad[0]} is not .jsonl, .json or .parquet")
    return files


def _data_files(root: Path, data_files, split: str | None, key: str) -> list[Path]:
    if isinstance(data_files, dict):
        if split not in data_files:
            raise FileDataError(
                f"{key}.hf_kwargs.data_files has no split {split!r}; it has {sorted(data_files)}"
            )
        data_files = data_files[split]
    patterns = [data_files] if isinstance(data_files, str) else data_files
    files = sorted({Path(p) for pattern in patterns for p in glob.glob(str(root / pattern), recursive=True)})
    if not files:
        raise FileDataError(f"{key}.hf_kwargs.data_files {patterns} matches no file under {root}")
    return [p for p in files if p.is_file()]


def split_files(root: Path, split: str | None, key: str) -> list[Path]:
    """HF's convention: files (or folders) named after a split hold it; without any, all files are `train`."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CONVERSATION_SUFFIXES)
    if not files:
        raise FileDataError(f"{key}.hf_name: {root} holds no .jsonl, .json or .parquet file")

    def split_of(path: Path) -> str | None:
        parts = path.relative_to(root).parts
        for part in [*parts[:-1], path.name]:
            for name in SPLIT_NAMES:
                if part == name or (part.startswith(name) and part[len(name)] in "-_."):
                    return name
        return None

    named = {p: split_of(p) for p in files}
    if not any(named.values()):
        if split in (None, "train"):
            return files
        raise FileDataError(f"{key}.split is {split!r} but no file under {root} is named after a split")
    chosen = [p for p, s in named.items() if s == (split or "train")]
    if not chosen:
        present = sorted({s for s in named.values() if s})
        raise FileDataError(
            f"{key}.split: no file under {root} holds split {split!r}; found splits {present}"
        )
    return chosen


SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "eval", "dev")


def conversion_options(dataset: FinetuningDatasetConfig, max_seq_len: int) -> dict:
    """The keyword arguments of `convert_conversations` the config asks for (and the cache key's options)."""
    ratio = dataset.packing_ratio
    return {
        "max_seq_len": max_seq_len,
        "truncation": "truncate",
        "skip_bad": dataset.skip_bad_rows,
        "skip_hint": "set dataset.skip_bad_rows: true",
        "pack": ratio is not None and ratio != 1,
        "max_per_row": None if ratio in (None, "auto") else int(-(-ratio // 1)),
        "last_response_only": dataset.target_responses == "last",
    }


def _code_version() -> str:
    """The conversion's source: a change to the converter, chat format or tokenizer is a new key."""
    digest = hashlib.sha256()
    for module in (dbrx_train.data.finetuning, dbrx_train.data.chat, dbrx_train.data.tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def cache_folder(dataset: FinetuningDatasetConfig, max_seq_len: int, key: str) -> Path:
    files = find_files(dataset, key)
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([stats, conversion_options(dataset, max_seq_len), _code_version()])
    root = (
        Path(dataset.cache_dir).expanduser() if dataset.cache_dir else Path.home() / ".cache" / "dbrx-train"
    )
    return root / "finetuning" / hashlib.sha256(blob.encode()).hexdigest()[:20]


def as_mds(loader: FinetuningLoaderConfig, max_seq_len: int, key: str) -> FinetuningLoaderConfig:
    """The loader config reading the tokenized cache of its hf_name files (unchanged without hf_name)."""
    if loader.dataset.hf_name is None:
        return loader
    folder = cache_folder(loader.dataset, max_seq_len, key)
    dataset = dataclasses.replace(loader.dataset, hf_name=None, local=str(folder), split=None)
    # The options are spent on the conversion; put back their defaults so the MDS path accepts it.
    for name in ("packing_ratio", "target_responses", "skip_bad_rows", "cache_dir"):
        dataset = dataclasses.replace(dataset, **{name: getattr(FinetuningDatasetConfig(), name)})
    return dataclasses.replace(loader, dataset=dataset)


def tokenize_once(loader: FinetuningLoaderConfig, max_seq_len: int, key: str, local_rank: int) -> Path | None:
    """Make the tokenized cache of `loader`'s hf_name files if it is missing: local rank 0 converts,
    the other local ranks (of the same launcher) wait. Returns the folder (None without hf_name);
    raises FileDataError."""
    if loader.dataset.hf_name is None:
        return None
    dataset = loader.dataset
    folder = cache_folder(dataset, max_seq_len, key)
    if (folder / "index.json").is_file():
        return folder
    launch = f"{socket.gethostname()}-{os.getppid()}"  # the same for every rank this launcher started
    failed = folder.with_name(f"{folder.name}.failed-{launch}")
    building = folder.with_name(f"{folder.name}.building-{launch}")
    if local_rank != 0:
        return _wait_for(folder, failed, building)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building.write_text(str(os.getpid()))
    partial = folder.with_name(f"{folder.name}.tmp-{launch}-{os.getpid()}")
    try:
        files = find_files(dataset, key)
        print(
            f"dbrx-train: {key}: tokenizing {len(files)} file(s) of {dataset.hf_name} into {folder}",
            flush=True,
        )
        summary = convert_conversations(
            iter_file_conversations(files), partial, **conversion_options(dataset, max_seq_len)
        )
        try:
            partial.rename(folder)
        except OSError:  # another node sharing this cache finished first
            if not (folder / "index.json").is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
        print(f"dbrx-train: {key}: {summary.describe()}", flush=True)
        return folder
    except (BadRow, ValueError, OSError) as error:
        message = f"{key}.dataset.hf_name: {error}"
        failed.write_text(message)
        shutil.rmtree(partial, ignore_errors=True)
        raise FileDataError(message) from None
    finally:
        building.unlink(missing_ok=True)


def _wait_for(folder: Path, failed: Path, building: Path) -> Path:
    started = time.monotonic()
    while True:
        if (folder / "index.json").is_file():
            return folder
        if failed.is_file():
            raise FileDataError(failed.read_text())
        if building.is_file():
            started = time.monotonic()  # rank 0 is at work: wait as long as it takes
            if not _alive(building):
                raise FileDataError(f"local rank 0 died while tokenizing into {folder}; run again")
        elif time.monotonic() - started > WAIT_FOR_BUILDER_S:
            raise FileDataError(
                f"local rank 0 did not start tokenizing into {folder} within {WAIT_FOR_BUILDER_S:.0f} s"
            )
        time.sleep(0.2)


def _alive(building: Path) -> bool:
    """Whether the process named in `building` runs (a file removed meanwhile: it just finished)."""
    try:
        pid = int(building.read_text())
    except (OSError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
