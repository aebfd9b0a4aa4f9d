"""Bad MDS datasets, made deterministically from a good one the way real failures make them.

Each case damages a copy of a real pretraining stream folder: the default corpus's `prose/train`
(64-token samples of Python's help topics) rewritten by our own writer into ~13 zstd shards, so
that one shard (`BAD`, shard 3) can be damaged while the up-front first-sample check, which reads
shard 0, still passes. A case says when the damage must be caught:

    preflight  before any process group starts: one `dbrx-train: config error:` line, exit code 2
    read       only when the damaged shard or sample is read: an error naming stream and shard
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from streaming.base.compression import decompress

from dbrx_train.data.token_mds import iter_token_samples, read_index, write_token_mds

SEQ = 64  # the default corpus fixture's sequence length
VOCAB = 100352
SHARD_BYTES = 32_768  # ~120 samples per shard: ~13 shards from the 1524 samples of prose/train
BAD = "shard.00003"  # the shard the single-shard cases damage


def good_rows(corpus: Path) -> list[np.ndarray]:
    folder = corpus / "prose" / "train"
    return [ids for _, ids in iter_token_samples(folder, read_index(folder, "corpus")["shards"], "corpus")]


def write_good(folder: Path, rows: list[np.ndarray], **options) -> Path:
    """The good dataset: our writer (zstd shards, sha1 + xxh3_64 hashes in index.json)."""
    write_token_mds(rows, folder, size_limit=SHARD_BYTES, **options)
    return folder


def _noise(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / "index.json").write_text(json.dumps(index))


def _rewrite(folder: Path, columns: dict[str, str], samples: list[dict]) -> None:
    shutil.rmtree(folder)
    with MDSWriter(columns=columns, out=str(folder), compression="zstd", size_limit=SHARD_BYTES) as writer:
        for sample in samples:
            writer.write(sample)


def _in_bad_shard(folder: Path) -> range:
    """The sample indices (within the stream) that live in shard 3."""
    counts = [shard["samples"] for shard in _index(folder)["shards"]]
    start = sum(counts[:3])
    return range(start, start + counts[3])


def _rewrite_bad_shard(
    folder: Path, columns: dict[str, str], samples: list[dict], spoil: Callable, *, from_sample: int = 0
) -> None:
    """Rewrite with these columns, `spoil` applied to the samples of shard 3 from its `from_sample`th
    on (found by writing the good samples first; spoiling keeps sizes, so the layout stays)."""
    _rewrite(folder, columns, samples)
    bad = _in_bad_shard(folder)[from_sample:]
    _rewrite(folder, columns, [spoil(sample) if i in bad else sample for i, sample in enumerate(samples)])


# --- damage to shard files -------------------------------------------------------------------
def truncated_zstd(folder: Path, rows: list[np.ndarray]) -> None:
    path = folder / f"{BAD}.mds.zstd"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy


def truncated_raw(folder: Path, rows: list[np.ndarray]) -> None:
    shutil.rmtree(folder)
    write_good(folder, rows, compression=None)  # uncompressed shards: shard.0000N.mds only
    path = folder / f"{BAD}.mds"
    path.write_bytes(path.read_bytes()[:-1000])


def garbage_zstd(folder: Path, rows: list[np.ndarray]) -> None:
    """Same size, other bytes (a bad disk block, a botched sync): no stat can see it."""
    path = folder / f"{BAD}.mds.zstd"
    path.write_bytes(_noise(path.stat().st_size))


def garbage_zstd_no_hashes(folder: Path, rows: list[np.ndarray]) -> None:
    garbage_zstd(folder, rows)
    index = _index(folder)
    for shard in index["shards"]:
        shard["hashes"] = []
        shard["raw_data"]["hashes"] = {}
        shard["zip_data"]["hashes"] = {}
    _write_index(folder, index)


def missing_shard(folder: Path, rows: list[np.ndarray]) -> None:
    (folder / f"{BAD}.mds.zstd").unlink()


def raw_without_zip(folder: Path, rows: list[np.ndarray]) -> None:
    """Someone decompressed a shard and deleted the .zstd to save space."""
    zipped = folder / f"{BAD}.mds.zstd"
    (folder / f"{BAD}.mds").write_bytes(decompress("zstd", zipped.read_bytes()))
    zipped.unlink()


# --- damage to index.json --------------------------------------------------------------------
def index_truncated(folder: Path, rows: list[np.ndarray]) -> None:
    path = folder / "index.json"
    path.write_bytes(path.read_bytes()[:100])  # a writer killed mid-write


def index_binary(folder: Path, rows: list[np.ndarray]) -> None:
    (folder / "index.json").write_bytes(_noise(300))


def index_not_an_index(folder: Path, rows: list[np.ndarray]) -> None:
    (folder / "index.json").write_text("[1, 2, 3]")


def index_escapes_folder(folder: Path, rows: list[np.ndarray]) -> None:
    index = _index(folder)
    index["shards"][3]["zip_data"]["basename"] = "../../../etc/passwd"
    _write_index(folder, index)


# --- wrong columns and dtypes ----------------------------------------------------------------
def tokens_float_column(folder: Path, rows: list[np.ndarray]) -> None:
    _rewrite(folder, {"tokens": "ndarray:float32"}, [{"tokens": row.astype(np.float32)} for row in rows])


def tokens_str_column(folder: Path, rows: list[np.ndarray]) -> None:
    _rewrite(folder, {"tokens": "str"}, [{"tokens": " ".join(map(str, row))} for row in rows])


def tokens_float_later(folder: Path, rows: list[np.ndarray]) -> None:
    """A dynamic-dtype column: int32 samples, except float32 ones in shard 3."""
    _rewrite_bad_shard(
        folder,
        {"tokens": "ndarray"},
        [{"tokens": row} for row in rows],
        lambda s: {"tokens": s["tokens"].astype(np.float32)},
    )


def legacy_bytes_int32(folder: Path, rows: list[np.ndarray]) -> None:
    """int32 ids in the legacy `bytes` column, which holds int64 ids."""
    _rewrite(folder, {"bytes": "bytes"}, [{"bytes": row.astype(np.int32).tobytes()} for row in rows])


def legacy_bytes_odd_length(folder: Path, rows: list[np.ndarray]) -> None:
    _rewrite(folder, {"bytes": "bytes"}, [{"bytes": row.astype(np.int64).tobytes()[:-3]} for row in rows])


class RunsCode:
    """Unpickling this runs a shell command: what a malicious dataset would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_column(folder: Path, rows: list[np.ndarray]) -> None:
    marker = folder.parent / "pwned"
    samples = [{"tokens": row, "meta": RunsCode(marker)} for row in rows]
    _rewrite(folder, {"tokens": "ndarray:int32", "meta": "pkl"}, samples)


# --- token ids -------------------------------------------------------------------------------
def oov_first(folder: Path, rows: list[np.ndarray]) -> None:
    rows = [row.copy() for row in rows]
    rows[0][5] = VOCAB
    shutil.rmtree(folder)
    write_good(folder, rows)


def oov_later(folder: Path, rows: list[np.ndarray]) -> None:
    rows = [row.copy() for row in rows]
    rows[_in_bad_shard(folder)[7]][5] = VOCAB + 48
    shutil.rmtree(folder)
    write_good(folder, rows)


@dataclass(frozen=True)
class Case:
    damage: Callable[[Path, list[np.ndarray]], None]
    when: str  # "preflight" or "read"
    expect: tuple[str, ...]  # substrings of the error message
    verify_shards: str = "size"  # train_loader.dataset.verify_shards


TEXT_CASES: dict[str, Case] = {
    "truncated-zstd": Case(
        truncated_zstd, "preflight", (f"{BAD}.mds.zstd has", "index.json records", "truncated")
    ),
    "truncated-raw": Case(truncated_raw, "preflight", (f"{BAD}.mds has", "index.json records", "truncated")),
    "garbage-zstd": Case(
        garbage_zstd,
        "read",
        ("train_loader.dataset", f"shard {BAD}.mds / {BAD}.mds.zstd", "could not be prepared", "zstd.Error"),
    ),
    "garbage-zstd-hash": Case(
        garbage_zstd, "preflight", (f"{BAD}.mds.zstd does not match its xxh3_64 hash", "corrupt"), "hash"
    ),
    "garbage-zstd-full": Case(
        garbage_zstd_no_hashes, "preflight", (f"{BAD}.mds.zstd cannot be decompressed", "zstd"), "full"
    ),
    "garbage-zstd-hash-but-none-recorded": Case(
        garbage_zstd_no_hashes,
        "preflight",
        ("records no hash for shard.00000.mds.zstd", "verify_shards: full"),
        "hash",
    ),
    "missing-shard": Case(missing_shard, "preflight", (f"{BAD}.mds.zstd listed in index.json is missing",)),
    "raw-without-zip": Case(
        raw_without_zip, "preflight", (f"{BAD}.mds is there but not {BAD}.mds.zstd", "would delete")
    ),
    "index-truncated": Case(index_truncated, "preflight", ("index.json is not valid JSON",)),
    "index-binary": Case(index_binary, "preflight", ("index.json is not valid JSON",)),
    "index-not-an-index": Case(index_not_an_index, "preflight", ("is not a Streaming MDS index",)),
    "index-escapes-folder": Case(
        index_escapes_folder, "preflight", ("shard entry 3", "not a file name inside the dataset folder")
    ),
    "tokens-float-column": Case(
        tokens_float_column,
        "preflight",
        ("column `tokens` is encoded as `ndarray:float32`", "not integer ids"),
    ),
    "tokens-str-column": Case(
        tokens_str_column, "preflight", ("column `tokens` is encoded as `str`", "not as an ndarray")
    ),
    "tokens-float-later": Case(
        tokens_float_later, "read", (f"(shard {BAD}.mds)", "not a 1-D array of integer token ids", "float32")
    ),
    "tokens-float-later-full": Case(
        tokens_float_later,
        "preflight",
        (f"(shard {BAD}.mds)", "not a 1-D array of integer token ids"),
        "full",
    ),
    "legacy-bytes-int32": Case(
        legacy_bytes_int32,
        "preflight",
        ("sample 0 (shard shard.00000.mds)", "holds int64 ids (8 bytes each)"),
    ),
    "legacy-bytes-odd-length": Case(
        legacy_bytes_odd_length, "preflight", ("sample 0", "not a whole number of int64 ids")
    ),
    "pickle-column": Case(
        pickle_column, "preflight", ("column `meta` is encoded as `pkl`", "runs arbitrary code")
    ),
    "oov-first-sample": Case(
        oov_first,
        "preflight",
        ("sample 0 (shard shard.00000.mds)", "token id 100352, outside [0, vocab_size"),
    ),
    "oov-later-sample": Case(oov_later, "read", (f"(shard {BAD}.mds)", "token id 100400, outside")),
    "oov-later-sample-full": Case(oov_later, "preflight", (f"(shard {BAD}.mds)", "token id 100400"), "full"),
}


# --- fine-tuning data ------------------------------------------------------------------------
def finetuning_rows(rows: list[np.ndarray]) -> list[dict]:
    """Conversations-shaped samples from real ids: train on the second half of each row."""
    samples = []
    for row in rows:
        labels = row.copy()
        labels[: len(row) // 2] = -100
        samples.append({"input_ids": row, "labels": labels})
    return samples


def write_good_finetuning(folder: Path, rows: list[np.ndarray]) -> Path:
    with MDSWriter(
        columns={"input_ids": "ndarray:int32", "labels": "ndarray:int32"},
        out=str(folder),
        compression="zstd",
        size_limit=SHARD_BYTES,
        hashes=["sha1"],
    ) as writer:
        for sample in finetuning_rows(rows):
            writer.write(sample)
    return folder


def ft_labels_unsigned(folder: Path, rows: list[np.ndarray]) -> None:
    samples = [{"input_ids": row, "labels": row.astype(np.uint32)} for row in rows]
    _rewrite(folder, {"input_ids": "ndarray:int32", "labels": "ndarray:uint32"}, samples)


def ft_float_ids_later(folder: Path, rows: list[np.ndarray]) -> None:
    """Past the first sample of shard 3, which the check before training reads (it reads the first
    sample of every fine-tuning shard)."""
    _rewrite_bad_shard(
        folder,
        {"input_ids": "ndarray", "labels": "ndarray:int32"},
        finetuning_rows(rows),
        lambda s: {**s, "input_ids": s["input_ids"].astype(np.float32)},
        from_sample=1,
    )


def ft_float_ids_first_in_shard(folder: Path, rows: list[np.ndarray]) -> None:
    _rewrite_bad_shard(
        folder,
        {"input_ids": "ndarray", "labels": "ndarray:int32"},
        finetuning_rows(rows),
        lambda s: {**s, "input_ids": s["input_ids"].astype(np.float32)},
    )


FINETUNING_CASES: dict[str, Case] = {
    "ft-labels-unsigned": Case(
        ft_labels_unsigned, "preflight", ("column `labels` is encoded as `ndarray:uint32`", "signed integers")
    ),
    "ft-float-ids-later": Case(
        ft_float_ids_later, "read", (f"(shard {BAD}.mds)", "input_ids of dtype float32", "signed integers")
    ),
    "ft-float-ids-first-in-shard": Case(
        ft_float_ids_first_in_shard, "preflight", (f"(shard {BAD}.mds)", "input_ids of dtype float32")
    ),
    "ft-garbage-zstd": Case(garbage_zstd, "preflight", (f"{BAD}.mds.zstd cannot be decompressed", "zstd")),
    "ft-truncated-zstd": Case(truncated_zstd, "preflight", (f"{BAD}.mds.zstd has", "truncated")),
}
