"""Are the shard files what index.json says? Checked before training and again as they are read.

Before any process group starts (`verify_shards`, per local folder; see docs/data.md):

    none  nothing beyond index.json and the first sample
    size  every shard file listed in index.json is there with the recorded byte size (stat only)
    hash  size, and each file against a hash index.json records (xxh3 if there, else sha1, ...)
    full  size, hashes where recorded, and every sample of every shard decompressed and checked

While training (unless `none`), each shard file is checked against its hash in index.json the first
time a process reads a sample from it (`GuardedStreamingDataset(verify_on_read=True)`; about 2 ms
per MB with xxh3_64, once per shard and process: docs/data.md has the measurements), so a bit flip
that leaves the size alone is never trained on. A shard Streaming cannot prepare (decompress,
download, check a hash) or a sample it cannot decode raises `ShardReadError`, naming the stream,
shard and folder. Left to itself,
Streaming 0.13 does worse: when its background thread fails to decompress a shard it logs the
error, ends the epoch early without raising (a silently short epoch), and leaves the shard marked
PREPARING in shared memory, where this rank's main thread and every other rank on the node wait for
it without a timeout. `GuardedStreamingDataset` turns each of those into the error.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.hashing import get_hash, get_hashes

from dbrx_train.data.streaming_shm import exclusive_shm_prefix

INDEX_FILE = "index.json"
CORRUPT_FIX = "Copy the dataset again from where it came from, or re-create it"
VerifyShards = Literal["none", "size", "hash", "full"]
# Fastest first: xxh3 hashes at memory speed, sha1 at about 1 GB/s.
HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh3_128", "xxh128", "xxh32", "sha1", "md5", "sha256", "blake2b")


def at_most_size(level: str) -> str:
    """The level to re-check with when a loader is rebuilt (each curriculum segment): the costly
    hash/full checks ran once before training."""
    return "none" if level == "none" else "size"


def check_shard_files(
    folder: Path, index: dict[str, Any], name: str, level: str, *, remote: bool = False
) -> None:
    """The `size` and `hash` checks of `verify_shards` for one folder and its loaded index.json.
    `remote`: the folder is a stream's `remote`, from which Streaming copies files as they are
    listed (so the compressed file must be there when the index lists one)."""
    if level == "none":
        return
    for shard in index["shards"]:
        raw_info, zip_info = shard["raw_data"], shard.get("zip_data")
        raw = folder / raw_info["basename"]
        zipped = folder / zip_info["basename"] if zip_info else None
        has_raw, has_zip = raw.is_file(), zipped is not None and zipped.is_file()
        if zipped is not None and not has_zip and (remote or not has_raw):
            raise FileNotFoundError(
                f"{name}: shard file {zipped} listed in {INDEX_FILE} is missing. {CORRUPT_FIX}"
            )
        if not has_raw and not has_zip:
            raise FileNotFoundError(
                f"{name}: shard file {raw} listed in {INDEX_FILE} is missing. {CORRUPT_FIX}"
            )
        if zipped is not None and has_raw and not has_zip:
            raise ValueError(
                f"{name}: {raw} is there but not {zipped.name}, which {INDEX_FILE} lists. Streaming would "
                f"delete {raw.name} as a leftover of an earlier decompression (it keeps a raw shard only next "
                f"to its compressed file) and then fail, with no remote to fetch it from. Put {zipped.name} "
                f"back (copy the dataset folder again)"
            )
        present = [(raw, raw_info)] if has_raw else []
        present += [(zipped, zip_info)] if has_zip else []
        for path, info in present:
            size = path.stat().st_size
            if size != info["bytes"]:
                raise ValueError(
                    f"{name}: shard file {path} has {size:,} bytes, but {INDEX_FILE} records {info['bytes']:,}: "
                    f"it is truncated or was overwritten (an interrupted copy?). {CORRUPT_FIX}"
                )
        if level in ("hash", "full"):
            for path, info in present:
                _check_hash(path, info, name, required=level == "hash")


def preferred_hash(recorded: dict[str, str]) -> str | None:
    """The fastest hash algorithm index.json records for a file that we can compute, or None."""
    known = [algo for algo in HASH_PREFERENCE if algo in recorded]
    known += sorted(algo for algo in recorded if algo in get_hashes() and algo not in known)
    return known[0] if known else None


def _check_hash(path: Path, info: dict[str, Any], name: str, *, required: bool) -> None:
    recorded = info.get("hashes") or {}
    algo = preferred_hash(recorded)
    if algo is None:
        if required:
            raise ValueError(
                f"{name}: {INDEX_FILE} records no hash for {path.name}, so `verify_shards: hash` cannot check "
                f"it. Use `verify_shards: full` (decodes every sample) or `size`, or re-create the dataset "
                f"with data_prep/ (its writers record sha1 and xxh3_64)"
            )
        return
    if get_hash(algo, path.read_bytes()) != recorded[algo]:
        raise ValueError(
            f"{name}: shard file {path} does not match its {algo} hash in {INDEX_FILE}: it is corrupt. "
            f"{CORRUPT_FIX}"
        )


def error_text(error: BaseException) -> str:
    """'zstd.Error: ...', 'ValueError: ...': the library's error with the type that says whose it is."""
    kind = type(error)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {error}"


class ShardReadError(ValueError):
    """A shard or sample that cannot be read while training; the message names stream and shard."""


class CheckedStream(Stream):
    """A Stream whose shard preparation (download, hash check, decompression) fails with a
    `ShardReadError` naming `key` (the stream's config key) and the shard's files."""

    def __init__(self, *, key: str, **stream_kwargs: Any):
        super().__init__(**stream_kwargs)
        self.key = key

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Any]:
        try:
            return super().get_shards(world, allow_unsafe_types)
        except Exception as error:
            where = self.remote or self.local
            source = ("remote " if self.remote else "") + (f"{where}/{self.split}" if self.split else where)
            raise ShardReadError(
                f"{self.key}: could not read {INDEX_FILE} from {source} ({error_text(error)}). Check the path, "
                f"and for an object store its credentials (s3://: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE or an instance role) and the network"
            ) from error

    def prepare_shard(self, shard: Any) -> int:
        try:
            return super().prepare_shard(shard)
        except Exception as error:
            files = [info.basename for pair in shard.file_pairs for info in pair if info is not None]
            folder = Path(self.local, self.split or "")
            raise ShardReadError(
                f"{self.key}: shard {' / '.join(files)} in {folder} could not be prepared "
                f"({error_text(error)}); the file is corrupt, truncated or missing. {CORRUPT_FIX}; "
                f"`verify_shards: full` checks every shard before training starts"
            ) from error


# Shard files whose hash matched in this process, by (path, size, mtime): each is hashed once per
# process, however many datasets (one per curriculum segment) read it.
_VERIFIED: set[tuple[str, int, int]] = set()


class GuardedStreamingDataset(StreamingDataset):
    """A StreamingDataset (of `CheckedStream`s) whose read failures surface as one `ShardReadError`
    in the process that reads, never as a short epoch or a wait without end; with `verify_on_read`,
    no sample of a shard whose file does not match its recorded hash is returned."""

    _read_error: ShardReadError | None = None

    def __init__(
        self, *, stream_keys: list[str] | None = None, verify_on_read: bool = True, **streaming_kwargs: Any
    ):
        with exclusive_shm_prefix():  # no race with datasets that other processes start meanwhile
            super().__init__(**streaming_kwargs)
        # Config keys such as "train_loader.dataset.streams.code", for error messages.
        self.stream_keys = stream_keys or [f"stream {i}" for i in range(self.num_streams)]
        self.verify_on_read = verify_on_read
        self._verified_shards: set[int] = set()

    def verify_shard(self, shard_id: int) -> None:
        """The shard's files present on disk against the hashes index.json records (once per process)."""
        if shard_id in self._verified_shards:
            return
        shard = self.shards[shard_id]
        folder = Path(shard.dirname, shard.split or "")
        for raw, zipped in shard.file_pairs:
            # The decompressed file is what samples are read from; the compressed one only if it is alone.
            info = raw if (folder / raw.basename).is_file() or zipped is None else zipped
            path = folder / info.basename
            if not path.is_file() or (algo := preferred_hash(info.hashes or {})) is None:
                continue
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key in _VERIFIED:
                continue
            if get_hash(algo, path.read_bytes()) != info.hashes[algo]:
                stream = self.stream_keys[int(self.stream_per_shard[shard_id])]
                error = ShardReadError(
                    f"{stream}: shard file {path} does not match its {algo} hash in {INDEX_FILE}: it is "
                    f"corrupt (its samples are not used). {CORRUPT_FIX}"
                )
                self._fail(error)
                raise error
            _VERIFIED.add(key)
        self._verified_shards.add(shard_id)

    def describe_sample(self, idx: int) -> str:
        """'<stream key>: sample i (shard f) in <folder>' for error messages about sample `idx`."""
        shard_id, _ = self.spanner[idx]
        shard = self.shards[shard_id]
        stream_id = int(self.stream_per_shard[shard_id])
        in_stream = idx - int(self.sample_offset_per_stream[stream_id])
        folder = Path(shard.dirname, shard.split or "")
        return (
            f"{self.stream_keys[stream_id]}: sample {in_stream} (shard {shard.raw_data.basename}) in {folder}"
        )

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except ShardReadError as error:
            # Streaming leaves the shard PREPARING after a failure, and its readers wait for it to
            # leave that state with no timeout. Marked LOCAL with its raw file missing, every reader
            # (this process's main thread, other ranks on the node) prepares it again itself and
            # fails with this same error instead.
            with self._cache_filelock:  # created by Streaming's prepare_shard before it fails
                self._shard_states[shard_id] = _ShardState.LOCAL
            self._fail(error)
            raise

    def _fail(self, error: ShardReadError) -> None:
        self._read_error = error
        if hasattr(self, "_event"):
            self._event.set()  # stops this process's prepare and ready threads

    def on_exception(self, future: Future) -> None:
        # A ShardReadError from a background thread is raised by the main thread (`__iter__`,
        # `get_item`); re-raising it here only logs a traceback through Streaming's threads.
        if isinstance(future.exception(), ShardReadError):
            self._event.set()
            return
        super().on_exception(future)

    def __iter__(self):
        if self._read_error is not None:
            raise self._read_error
        yield from super().__iter__()
        # Streaming ends the epoch without an error when its background thread failed.
        if self._read_error is not None:
            raise self._read_error

    def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
        try:
            sample = super().get_item(idx, retry)
            if self.verify_on_read:
                self.verify_shard(self.spanner[idx][0])
            return sample
        except ShardReadError as error:
            self._fail(error)
            raise
        except Exception as error:
            if self._read_error is not None:  # Streaming's "Background thread failed"
                raise self._read_error from None
            wrapped = ShardReadError(
                f"{self.describe_sample(idx)} could not be read ({error_text(error)}); the shard "
                f"file is corrupt or truncated. {CORRUPT_FIX}; `verify_shards: full` checks every shard "
                f"before training starts"
            )
            self._fail(wrapped)
            raise wrapped from error
