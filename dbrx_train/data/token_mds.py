"""The on-disk contract for pretraining data: an MDS folder of fixed-length token sequences.

Columns follow LLM Foundry, so datasets prepared by either tool load in the other: we write
`tokens` as `ndarray:int32`, and read that or the legacy `bytes` column (raw int64 ids).

The checks here read a local folder directly (index.json, then shard files, decompressing in
memory) rather than through `StreamingDataset`, so they can run at config-check time without
shared memory, torch.distributed, or leaving decompressed copies next to the shards. index.json
is checked before anything is decoded: its structure, shard names that stay inside the folder,
column encodings (never `pkl`, which would run code). Shard files: data/integrity.py.
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
from streaming.base.format.mds.encodings import is_mds_encoding, is_mds_encoding_safe

from dbrx_train.data.integrity import CORRUPT_FIX, INDEX_FILE, check_shard_files

TOKENS_COLUMN = "tokens"
TOKENS_ENCODING = "ndarray:int32"
LEGACY_BYTES_COLUMN = "bytes"
# Recorded per shard file in index.json by our writers: sha1 for Streaming's `validate_hash: sha1`,
# xxh3_64 (~10x faster) for `verify_shards: hash`.
SHARD_HASHES = ["sha1", "xxh3_64"]

HOW_TO_MAKE_DATA = (
    "Create it with `python data_prep/convert_text_to_mds.py --input FILES --out DIR --max-seq-len N`, "
    "or run `make data` for the embedded default corpus."
)


def write_mds(
    samples: Iterable[dict[str, Any]],
    out: str | Path,
    columns: dict[str, str],
    *,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
) -> int:
    """Write samples ({column: value}, `columns` giving each column's MDS encoding) as an MDS dataset
    in `out` (which must be empty or absent), each shard's SHARD_HASHES in index.json. Returns the
    number of samples written. On error no index.json is written. Every writer of MDS data uses it."""
    writer = MDSWriter(
        columns=columns,
        out=str(out),
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    )
    num_samples = 0
    try:
        for sample in samples:
            writer.write(sample)
            num_samples += 1
    except BaseException:
        # Not `with MDSWriter(...)`: its __exit__ writes index.json even on error, which would
        # leave a truncated folder that looks like a complete dataset.
        writer.cancel_future_jobs()
        raise
    writer.finish()
    return num_samples


def write_token_mds(
    samples: Iterable[np.ndarray],
    out: str | Path,
    *,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
) -> int:
    """Write 1-D int32 token arrays as an MDS dataset of one `tokens` column (see `write_mds`)."""
    rows = ({TOKENS_COLUMN: tokens} for tokens in samples)
    columns = {TOKENS_COLUMN: TOKENS_ENCODING}
    return write_mds(rows, out, columns, compression=compression, size_limit=size_limit)


def sample_token_ids(sample: dict[str, Any]) -> np.ndarray:
    """The token ids of one decoded MDS sample, from whichever column it has."""
    if TOKENS_COLUMN in sample:
        return np.asarray(sample[TOKENS_COLUMN])
    if LEGACY_BYTES_COLUMN in sample:
        raw = sample[LEGACY_BYTES_COLUMN]
        if len(raw) % 8:
            raise ValueError(
                f"has a legacy `bytes` column of {len(raw)} bytes, not a whole number of int64 ids (8 bytes "
                f"each). {REPREPARE}"
            )
        return np.frombuffer(raw, np.int64)
    raise ValueError(
        f"has columns {sorted(sample)}, but pretraining data needs a `{TOKENS_COLUMN}` column "
        f"({TOKENS_ENCODING}) or a legacy `{LEGACY_BYTES_COLUMN}` column (int64 ids). {HOW_TO_MAKE_DATA}"
    )


REPREPARE = "Re-prepare it with data_prep/convert_text_to_mds.py, which writes `tokens` as ndarray:int32"


def find_token_problem(
    ids: np.ndarray, max_seq_len: int, vocab_size: int, *, legacy_bytes: bool = False
) -> str | None:
    """Why `ids` cannot be a training sequence for this model, or None if it can. Cheap: one
    pass for min/max, so it runs on every sample as it is read. `legacy_bytes`: the ids came
    from the legacy `bytes` column (raw int64), for a better hint when they were not int64."""
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return f"is not a 1-D array of integer token ids (shape {ids.shape}, dtype {ids.dtype}). {REPREPARE}"
    if legacy_bytes and len(ids) * 2 == max_seq_len:
        return (
            f"has a legacy `bytes` column of {ids.nbytes} bytes: {max_seq_len} ids of 4 bytes (int32?), but "
            f"that column holds int64 ids (8 bytes each). {REPREPARE}"
        )
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


def integer_array_problem(encoding: str, *, signed: bool = False) -> str | None:
    """Why an MDS column `encoding` cannot hold token ids (an ndarray of integers), or None."""
    kind, _, rest = encoding.partition(":")
    dtype = rest.partition(":")[0]
    if kind != "ndarray":
        return f"is encoded as `{encoding}`, not as an ndarray of integer ids (e.g. ndarray:int32)"
    if dtype and not np.issubdtype(np.dtype(dtype), np.signedinteger if signed else np.integer):
        wanted = "signed integers (for -100)" if signed else "integer ids"
        return f"is encoded as `{encoding}`: {dtype} values, not {wanted}"
    return None


@dataclass
class TokenMDSInfo:
    folder: Path
    num_samples: int
    num_shards: int
    column: str  # "tokens" or the legacy "bytes"


def read_index(
    folder: Path,
    name: str,
    *,
    columns: tuple[str, ...] | None = None,
    signed: tuple[str, ...] = (),
    how_to: str = HOW_TO_MAKE_DATA,
) -> dict[str, Any]:
    """Load and sanity-check `folder/index.json`. `name` says which dataset, for error messages.
    `columns`: the columns every shard must have, each an ndarray of integers (`signed`: of signed
    integers); None means pretraining's `tokens` (or legacy `bytes`).
    `how_to`: the command that makes such a dataset, appended to errors.
    Nothing is decoded here; a column whose encoding would run code when decoded (`pkl`) is refused."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: dataset folder {folder} does not exist. {how_to}")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{name}: {folder} has no {INDEX_FILE}, so it is not an MDS dataset (or its writer did not "
            f"finish). {how_to}"
        )
    try:
        index = json.loads(index_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{name}: {index_path} is not valid JSON ({error}): the writer did not finish or the file "
            f"was damaged. Copy the dataset again or re-create it. {how_to}"
        ) from error
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(
            f"{name}: {index_path} is not a Streaming MDS index (an object with a `shards` list). {how_to}"
        )
    if index.get("version") != 2:
        raise ValueError(f"{name}: {index_path} has version {index.get('version')!r}; Streaming needs 2")
    shards = index["shards"]
    for number, shard in enumerate(shards):
        problem = _shard_entry_problem(shard)
        if problem:
            raise ValueError(f"{name}: {index_path}: shard entry {number} {problem}. {how_to}")
    if sum(shard["samples"] for shard in shards) == 0:
        raise ValueError(f"{name}: {folder} holds no samples (empty dataset). {how_to}")
    for shard in shards:
        basename = shard["raw_data"]["basename"]
        if shard.get("format") != "mds":
            raise ValueError(f"{name}: shard {basename} in {folder} is `{shard.get('format')}`, not `mds`")
        have = shard["column_names"]
        encodings = dict(zip(have, shard["column_encodings"], strict=True))
        for column, encoding in encodings.items():
            if not _known_encoding(encoding):
                raise ValueError(
                    f"{name}: shard {basename} in {folder}: column `{column}` has unknown encoding `{encoding}`"
                )
            if not is_mds_encoding_safe(encoding):
                raise ValueError(
                    f"{name}: shard {basename} in {folder}: column `{column}` is encoded as `{encoding}`, which "
                    f"runs arbitrary code when read (pickle); refusing to read it. Re-create the dataset without "
                    f"that column. {how_to}"
                )
        if columns is not None:
            missing = [column for column in columns if column not in have]
            if missing:
                raise ValueError(
                    f"{name}: shard {basename} in {folder} has columns {have}, but this dataset needs "
                    f"{list(columns)} (missing {missing}). {how_to}"
                )
            needed = columns
        elif TOKENS_COLUMN in have:
            needed = (TOKENS_COLUMN,)
        elif LEGACY_BYTES_COLUMN in have:
            needed = ()
            if encodings[LEGACY_BYTES_COLUMN] != "bytes":
                raise ValueError(
                    f"{name}: shard {basename} in {folder}: the legacy `{LEGACY_BYTES_COLUMN}` column is encoded "
                    f"as `{encodings[LEGACY_BYTES_COLUMN]}`, not `bytes` (raw int64 ids). {REPREPARE}"
                )
        else:
            raise ValueError(
                f"{name}: shard {basename} in {folder} has columns {have}, but pretraining data needs "
                f"`{TOKENS_COLUMN}` ({TOKENS_ENCODING}) or legacy `{LEGACY_BYTES_COLUMN}`. {how_to}"
            )
        for column in needed:
            problem = integer_array_problem(encodings[column], signed=column in signed)
            if problem:
                raise ValueError(
                    f"{name}: shard {basename} in {folder}: column `{column}` {problem}. {how_to}"
                )
    return index


def _known_encoding(encoding: str) -> bool:
    try:
        return is_mds_encoding(encoding)
    except Exception:  # Streaming asserts on some malformed ones, e.g. `ndarray:float128`
        return False


def _shard_entry_problem(shard: Any) -> str | None:
    """What is malformed in one `shards` entry of index.json (so later code may index it freely)."""
    if not isinstance(shard, dict):
        return "is not an object"
    for key in ("raw_data", "zip_data"):
        info = shard.get(key)
        if info is None and key == "zip_data":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or info["bytes"] < 0:
            return f"has no valid `{key}` (basename and bytes)"
        basename = info.get("basename")
        # A plain file name: an index must not point readers at files outside its folder.
        if not isinstance(basename, str) or basename in ("", ".", "..") or Path(basename).name != basename:
            return f"has `{key}.basename` {basename!r}, not a file name inside the dataset folder"
    if not isinstance(shard.get("samples"), int) or shard["samples"] < 0:
        return f"has `samples` {shard.get('samples')!r}, not a count"
    names, encodings = shard.get("column_names"), shard.get("column_encodings")
    if not isinstance(names, list) or not isinstance(encodings, list) or len(names) != len(encodings):
        return "has no matching `column_names` and `column_encodings` lists"
    if not all(isinstance(x, str) for x in names + encodings):
        return "has column names or encodings that are not strings"
    if shard.get("zip_data") is not None and not isinstance(shard.get("compression"), str):
        return "has `zip_data` but no `compression`"
    try:  # what Streaming itself will do with the entry (other formats are refused by the caller)
        if shard.get("format") == "mds":
            reader_from_json("", None, shard)
    except Exception as error:  # a missing or unexpected key (TypeError), a bad value, ...
        return f"is not a valid MDS shard description ({type(error).__name__}: {error})"
    return None


def shard_bytes(folder: Path, shard: dict[str, Any], name: str) -> bytes:
    """One shard's uncompressed bytes, from the raw file or else the decompressed zip file, as
    many as index.json records. Errors name the file."""
    raw_info = shard["raw_data"]
    path = folder / raw_info["basename"]
    zip_info = shard.get("zip_data")
    if path.is_file():
        data = path.read_bytes()
    elif zip_info and (folder / zip_info["basename"]).is_file():
        path = folder / zip_info["basename"]
        try:
            data = decompress(shard["compression"], path.read_bytes())
        except Exception as error:  # each codec raises its own error type (zstd.Error, OSError, ...)
            raise ValueError(
                f"{name}: shard file {path} cannot be decompressed ({shard['compression']}: {error}): it is "
                f"corrupt or truncated. {CORRUPT_FIX}"
            ) from error
    else:
        missing = zip_info["basename"] if zip_info else path.name
        raise FileNotFoundError(f"{name}: shard file {folder / missing} listed in {INDEX_FILE} is missing")
    if len(data) != raw_info["bytes"]:
        raise ValueError(
            f"{name}: shard file {path} holds {len(data):,} bytes of shard data, but {INDEX_FILE} records "
            f"{raw_info['bytes']:,}: it is truncated or was overwritten. {CORRUPT_FIX}"
        )
    return data


def _header_problem(data: bytes, count: int) -> str | None:
    """What is wrong with a joint MDS shard's header: uint32 sample count, uint32 offsets[count + 1]
    (the first after the header, the last at the end of the file, never decreasing), then samples."""
    header = 4 * (count + 2)
    if len(data) < header:
        return f"{len(data)} bytes, too short for the offsets of {count} samples"
    stored = int(np.frombuffer(data, np.uint32, 1)[0])
    if stored != count:
        return f"it says {stored} samples, {INDEX_FILE} says {count}"
    offsets = np.frombuffer(data, np.uint32, count + 1, offset=4).astype(np.int64)
    if offsets[0] < header or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
        return "its sample offsets do not fit the file"
    return None


def iter_samples(
    folder: Path, shards: list[dict[str, Any]], name: str, *, limit_per_shard: int | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, for messages; decoded sample) for each sample of these shards of index.json."""
    first_in_shard = 0
    for shard in shards:
        basename = shard["raw_data"]["basename"]
        reader = reader_from_json(str(folder), None, shard)
        data = shard_bytes(folder, shard, name)
        count = shard["samples"]
        problem = _header_problem(data, count)
        if problem:
            raise ValueError(f"{name}: shard {basename} in {folder} is corrupt ({problem}). {CORRUPT_FIX}")
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        stop = count if limit_per_shard is None else min(count, limit_per_shard)
        for i in range(stop):
            location = f"sample {first_in_shard + i} (shard {basename})"
            try:
                sample = reader.decode_sample(data[offsets[i] : offsets[i + 1]])
            except Exception as error:  # whatever the column decoders raise on bytes that are not theirs
                raise ValueError(
                    f"{name}: {location} in {folder} cannot be decoded ({type(error).__name__}: {error}): the "
                    f"shard is corrupt. {CORRUPT_FIX}"
                ) from error
            yield location, sample
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
    verify_shards: str = "size",
    remote: bool = False,
) -> TokenMDSInfo:
    """Check that a local MDS folder can feed a model with this max_seq_len and vocab_size:
    index, columns, shard files (`verify_shards`, see data/integrity.py; `remote`: the folder is
    a stream's remote) and the first sample (or every sample with `all_samples` or `full`)."""
    folder = Path(folder)
    index = read_index(folder, name)
    check_shard_files(folder, index, name, verify_shards, remote=remote)
    all_samples = all_samples or verify_shards == "full"
    limit = None if all_samples else 1
    shards = index["shards"] if all_samples else [next(s for s in index["shards"] if s["samples"])]
    legacy = TOKENS_COLUMN not in index["shards"][0]["column_names"]
    for location, ids in iter_token_samples(folder, shards, name, limit_per_shard=limit):
        problem = find_token_problem(ids, max_seq_len, vocab_size, legacy_bytes=legacy)
        if problem:
            raise ValueError(f"{name}: {location} in {folder} {problem}.")
    first_columns = index["shards"][0]["column_names"]
    return TokenMDSInfo(
        folder=folder,
        num_samples=sum(shard["samples"] for shard in index["shards"]),
        num_shards=len(index["shards"]),
        column=TOKENS_COLUMN if TOKENS_COLUMN in first_columns else LEGACY_BYTES_COLUMN,
    )
