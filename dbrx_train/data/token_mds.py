"""The on-disk contract for pretraining data: an MDS folder of fixed-length token sequences.

Columns follow LLM Foundry, so datasets prepared by either tool load in the other: we write
`tokens` as `ndarray:int32`, and read that or the legacy `bytes` column (raw int64 ids).

The checks here read a local folder directly (index.json, then shard files, decompressing in
memory) rather than through `StreamingDataset`, so they can run at config-check time without
shared memory, torch.distributed, or leaving decompressed copies next to the shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json

TOKENS_COLUMN = "tokens"
TOKENS_ENCODING = "ndarray:int32"
LEGACY_BYTES_COLUMN = "bytes"
INDEX_FILE = "index.json"

HOW_TO_MAKE_DATA = (
    "Create it with `python data_prep/convert_text_to_mds.py --input FILES --out DIR --max-seq-len N`, "
    "or run `make data` for the embedded default corpus."
)


def write_token_mds(
    samples: Iterable[np.ndarray],
    out: str | Path,
    *,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
) -> int:
    """Write 1-D int32 token arrays as an MDS dataset in `out` (which must be empty or absent).
    Returns the number of samples written. On error no index.json is written."""
    # sha1 in the index lets readers opt into `validate_hash: sha1`.
    writer = MDSWriter(
        columns={TOKENS_COLUMN: TOKENS_ENCODING},
        out=str(out),
        compression=compression,
        hashes=["sha1"],
        size_limit=size_limit,
    )
    num_samples = 0
    try:
        for tokens in samples:
            writer.write({TOKENS_COLUMN: tokens})
            num_samples += 1
    except BaseException:
        # Not `with MDSWriter(...)`: its __exit__ writes index.json even on error, which would
        # leave a truncated folder that looks like a complete dataset.
        writer.cancel_future_jobs()
        raise
    writer.finish()
    return num_samples


def sample_token_ids(sample: dict[str, Any]) -> np.ndarray:
    """The token ids of one decoded MDS sample, from whichever column it has."""
    if TOKENS_COLUMN in sample:
        return np.asarray(sample[TOKENS_COLUMN])
    if LEGACY_BYTES_COLUMN in sample:
        raw = sample[LEGACY_BYTES_COLUMN]
        if len(raw) % 8:
            raise ValueError(f"has a `bytes` column of {len(raw)} bytes, not a whole number of int64 ids")
        return np.frombuffer(raw, np.int64)
    raise ValueError(
        f"has columns {sorted(sample)}, but pretraining data needs a `{TOKENS_COLUMN}` column "
        f"({TOKENS_ENCODING}) or a legacy `{LEGACY_BYTES_COLUMN}` column (int64 ids). {HOW_TO_MAKE_DATA}"
    )


def find_token_problem(ids: np.ndarray, max_seq_len: int, vocab_size: int) -> str | None:
    """Why `ids` cannot be a training sequence for this model, or None if it can. Cheap: one
    pass for min/max, so it runs on every sample as it is read."""
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return f"is not a 1-D array of integer token ids (shape {ids.shape}, dtype {ids.dtype})"
    if len(ids) != max_seq_len:
        return (
            f"has {len(ids)} tokens, but max_seq_len is {max_seq_len}. The model/YAML `max_seq_len` must "
            f"equal the dataset's sequence length ({len(ids)}), or re-prepare the data with "
            f"`--max-seq-len {max_seq_len}`"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return (
            f"has token id {bad}, outside [0, vocab_size={vocab_size}). It was tokenized for another "
            f"vocabulary: re-prepare it with data_prep/convert_text_to_mds.py, or fix the model's vocab_size"
        )
    return None


@dataclass
class TokenMDSInfo:
    folder: Path
    num_samples: int
    num_shards: int
    column: str  # "tokens" or the legacy "bytes"


def read_index(
    folder: Path, name: str, *, columns: tuple[str, ...] | None = None, how_to: str = HOW_TO_MAKE_DATA
) -> dict[str, Any]:
    """Load and sanity-check `folder/index.json`. `name` says which dataset, for error messages.
    `columns`: the columns every shard must have; None means pretraining's `tokens` (or `bytes`).
    `how_to`: the command that makes such a dataset, appended to errors."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: dataset folder {folder} does not exist. {how_to}")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{name}: {folder} has no {INDEX_FILE}, so it is not an MDS dataset (or its writer did not "
            f"finish). {how_to}"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: {index_path} is not valid JSON ({error}). {how_to}") from error
    if index.get("version") != 2:
        raise ValueError(f"{name}: {index_path} has version {index.get('version')!r}; Streaming needs 2")
    shards = index.get("shards") or []
    if sum(shard["samples"] for shard in shards) == 0:
        raise ValueError(f"{name}: {folder} holds no samples (empty dataset). {how_to}")
    for shard in shards:
        basename = shard["raw_data"]["basename"]
        if shard.get("format") != "mds":
            raise ValueError(f"{name}: shard {basename} in {folder} is `{shard.get('format')}`, not `mds`")
        have = shard["column_names"]
        if columns is not None:
            missing = [column for column in columns if column not in have]
            if missing:
                raise ValueError(
                    f"{name}: shard {basename} in {folder} has columns {have}, but this dataset needs "
                    f"{list(columns)} (missing {missing})"
                )
        elif TOKENS_COLUMN not in have and LEGACY_BYTES_COLUMN not in have:
            raise ValueError(
                f"{name}: shard {basename} in {folder} has columns {have}, but pretraining data needs "
                f"`{TOKENS_COLUMN}` ({TOKENS_ENCODING}) or legacy `{LEGACY_BYTES_COLUMN}`. {how_to}"
            )
    return index


def _shard_file_bytes(folder: Path, shard: dict[str, Any], name: str) -> bytes:
    raw = folder / shard["raw_data"]["basename"]
    if raw.is_file():
        return raw.read_bytes()
    zip_data = shard.get("zip_data")
    if zip_data and (folder / zip_data["basename"]).is_file():
        return decompress(shard["compression"], (folder / zip_data["basename"]).read_bytes())
    missing = zip_data["basename"] if zip_data else raw.name
    raise FileNotFoundError(f"{name}: shard file {folder / missing} listed in {INDEX_FILE} is missing")


def iter_samples(
    folder: Path, shards: list[dict[str, Any]], name: str, *, limit_per_shard: int | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, for messages; decoded sample) for each sample of these shards of index.json."""
    first_in_shard = 0
    for shard in shards:
        reader = reader_from_json(str(folder), None, shard)
        data = _shard_file_bytes(folder, shard, name)
        # Joint MDS shard layout: uint32 count, uint32 offsets[count + 1], then sample bytes.
        count = shard["samples"]
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        stop = count if limit_per_shard is None else min(count, limit_per_shard)
        for i in range(stop):
            sample = reader.decode_sample(data[offsets[i] : offsets[i + 1]])
            yield f"sample {first_in_shard + i} (shard {shard['raw_data']['basename']})", sample
        first_in_shard += count


def iter_token_samples(
    folder: Path, shards: list[dict[str, Any]], name: str, *, limit_per_shard: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (where, for messages; token ids) for each sample of these shards of index.json."""
    for location, sample in iter_samples(folder, shards, name, limit_per_shard=limit_per_shard):
        try:
            ids = sample_token_ids(sample)
        except ValueError as error:
            raise ValueError(f"{name}: {location} in {folder} {error}") from None
        yield location, ids


def check_token_mds(
    folder: str | Path,
    *,
    max_seq_len: int,
    vocab_size: int,
    name: str = "dataset",
    all_samples: bool = False,
) -> TokenMDSInfo:
    """Check that a local MDS folder can feed a model with this max_seq_len and vocab_size:
    index, columns, and the first sample (or every sample with `all_samples`)."""
    folder = Path(folder)
    index = read_index(folder, name)
    limit = None if all_samples else 1
    shards = index["shards"] if all_samples else [next(s for s in index["shards"] if s["samples"])]
    for location, ids in iter_token_samples(folder, shards, name, limit_per_shard=limit):
        problem = find_token_problem(ids, max_seq_len, vocab_size)
        if problem:
            raise ValueError(f"{name}: {location} in {folder} {problem}.")
    first_columns = index["shards"][0]["column_names"]
    return TokenMDSInfo(
        folder=folder,
        num_samples=sum(shard["samples"] for shard in index["shards"]),
        num_shards=len(index["shards"]),
        column=TOKENS_COLUMN if TOKENS_COLUMN in first_columns else LEGACY_BYTES_COLUMN,
    )
