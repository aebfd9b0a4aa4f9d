"""Text files -> tokenized, packed, fixed-length MDS samples (the pretraining data format).

    documents (.txt / .jsonl / .parquet) -> token ids + EOS per document (worker threads)
      -> one long stream cut into rows of exactly max_seq_len -> MDS `tokens: ndarray:int32`

The output depends only on the inputs and the options: documents are read in sorted path
order, and the worker threads' results are consumed in submission order, so the same inputs
give byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dbrx_train.data.token_mds import INDEX_FILE, check_token_mds, write_token_mds
from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer
from dbrx_train.vocab import DBRX_VOCAB_SIZE

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOCUMENTS_PER_TASK = 64  # documents sent to a worker at a time: big enough to amortise pickling


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Paths, globs and folders (searched recursively) -> sorted list of supported files."""
    files: set[Path] = set()
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        for match in matches:
            if match.is_dir():
                files.update(p for p in match.rglob("*") if p.suffix in SUPPORTED_SUFFIXES and p.is_file())
            elif match.suffix in SUPPORTED_SUFFIXES:
                files.add(match)
            else:
                raise ValueError(f"{match}: unsupported file type; expected one of {SUPPORTED_SUFFIXES}")
    if not files:
        raise FileNotFoundError(f"--input {list(patterns)} holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
    return sorted(files)


def iter_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of each file, in order: a whole .txt file, one .jsonl line, one .parquet row."""
    for path in paths:
        path = Path(path)
        if path.suffix == ".txt":
            yield _decode_utf8(path.read_bytes(), str(path))
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            raise ValueError(f"{path}: unsupported file type; expected one of {SUPPORTED_SUFFIXES}")


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 text ({error})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            where = f"{path}:{line_number}"
            line = _decode_utf8(raw_line, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{where}: expected an object with a string field {text_field!r}")
            yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # only needed for parquet inputs
    except ImportError:
        raise ImportError(f"{path}: reading .parquet needs pyarrow: `pip install pyarrow`") from None

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}: row {row} of column {text_field!r} is {type(text).__name__}, not text"
                )
            yield text
            row += 1


def _tokenize_with(tokenizer: DbrxTokenizer, texts: list[str]) -> list[np.ndarray]:
    eos = tokenizer.eos_token_id
    return [np.array([*tokenizer.encode(text), eos], np.int32) for text in texts]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    texts = iter(texts)
    while chunk := list(islice(texts, size)):
        yield chunk


def tokenize_documents(texts: Iterable[str], *, num_workers: int = 1) -> Iterator[np.ndarray]:
    """Each document's token ids followed by EOS (int32), in input order. `num_workers` > 1
    tokenizes in that many threads."""
    tokenizer = load_tokenizer()
    if num_workers <= 1:
        for chunk in _chunks(texts, DOCUMENTS_PER_TASK):
            yield from _tokenize_with(tokenizer, chunk)
        return
    # Threads, not processes: tiktoken's BPE releases the GIL (as in its own encode_ordinary_batch),
    # so threads encode in parallel while this thread packs and writes, with no pickling of texts
    # and ids between processes. Results are consumed in submission order through a bounded
    # window, so memory stays flat and the output does not depend on the number of workers.
    with ThreadPoolExecutor(num_workers) as pool:
        in_flight: deque[Future] = deque()
        for chunk in _chunks(texts, DOCUMENTS_PER_TASK):
            in_flight.append(pool.submit(_tokenize_with, tokenizer, chunk))
            if len(in_flight) >= 2 * num_workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


class TokenPacker:
    """Concatenates token arrays and cuts the result into rows of exactly `max_seq_len`.
    Documents span row boundaries; the last partial row is dropped (see `remainder`)."""

    def __init__(self, max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self._pending: list[np.ndarray] = []
        self._num_pending = 0

    def push(self, tokens: np.ndarray) -> list[np.ndarray]:
        """Add tokens; return the rows they complete."""
        self._pending.append(tokens)
        self._num_pending += len(tokens)
        if self._num_pending < self.max_seq_len:
            return []
        joined = np.concatenate(self._pending)
        num_rows = len(joined) // self.max_seq_len
        cut = num_rows * self.max_seq_len
        self._pending = [joined[cut:]]
        self._num_pending = len(joined) - cut
        return list(joined[:cut].reshape(num_rows, self.max_seq_len))

    @property
    def remainder(self) -> int:
        """Tokens waiting for a row; dropped if no more tokens come."""
        return self._num_pending


@dataclass
class PackSummary:
    documents: int
    tokens: int  # tokenized, including one EOS per document
    samples: int
    dropped_tokens: int  # the final partial row
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def describe(self) -> str:
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens -> {self.samples:,} samples "
            f"({self.dropped_tokens:,} trailing tokens dropped) in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s)"
        )


def prepare_output_folder(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a new dataset. Refuses to replace anything but an MDS dataset, so a
    mistyped --out with --overwrite cannot wipe an unrelated folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    if not (out / INDEX_FILE).is_file():
        raise FileExistsError(
            f"{out} is not empty and has no {INDEX_FILE}, so it is not an MDS dataset; refusing to "
            f"delete it even with --overwrite. Remove it yourself or choose another --out"
        )
    shutil.rmtree(out)


def pack_to_mds(
    token_arrays: Iterable[np.ndarray],
    out: str | Path,
    *,
    max_seq_len: int,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
    overwrite: bool = False,
    progress: bool = True,
    vocab_size: int = DBRX_VOCAB_SIZE,
) -> PackSummary:
    """Pack per-document token arrays into rows of max_seq_len, write them as MDS in `out`,
    then re-read every sample to check count, length and vocabulary."""
    out = Path(out)
    prepare_output_folder(out, overwrite)
    packer = TokenPacker(max_seq_len)
    counts = {"documents": 0, "tokens": 0}
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenizing -> {out}", unit=" docs", disable=not progress)

    def show_token_rate() -> None:
        rate = counts["tokens"] / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(tokens=f"{counts['tokens']:,}", tokens_per_s=f"{rate:,.0f}", refresh=False)

    def rows() -> Iterator[np.ndarray]:
        for tokens in token_arrays:
            counts["documents"] += 1
            counts["tokens"] += len(tokens)
            if counts["documents"] % 64 == 0:
                show_token_rate()
            bar.update(1)
            yield from packer.push(tokens)
        show_token_rate()

    try:
        with bar:
            samples = write_token_mds(rows(), out, compression=compression, size_limit=size_limit)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # `out` was empty or absent before: leave no partial dataset
        raise
    seconds = time.perf_counter() - start
    if samples == 0:
        shutil.rmtree(out, ignore_errors=True)
        raise ValueError(
            f"the input holds {counts['tokens']} tokens, fewer than one sample of max_seq_len={max_seq_len}; "
            f"nothing was written to {out}. Add more text or lower --max-seq-len"
        )
    written = check_token_mds(
        out, max_seq_len=max_seq_len, vocab_size=vocab_size, name="output", all_samples=True
    )
    if written.num_samples != samples:
        raise RuntimeError(f"{out}: wrote {samples} samples but its index lists {written.num_samples}")
    return PackSummary(counts["documents"], counts["tokens"], samples, packer.remainder, seconds)


def convert_text_to_mds(
    inputs: Sequence[str],
    out: str | Path,
    *,
    max_seq_len: int,
    text_field: str = "text",
    num_workers: int = 1,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
    overwrite: bool = False,
    progress: bool = True,
) -> PackSummary:
    """Files/globs/folders of text -> one MDS dataset of max_seq_len-token samples in `out`."""
    paths = expand_inputs(inputs)
    documents = iter_documents(paths, text_field)
    return pack_to_mds(
        tokenize_documents(documents, num_workers=num_workers),
        out,
        max_seq_len=max_seq_len,
        compression=compression,
        size_limit=size_limit,
        overwrite=overwrite,
        progress=progress,
    )
