"""Build the default pretraining corpus from text that ships with Python: no download needed.

    python data_prep/build_default_corpus.py --out data/default

Streams (each split into train/val and written as MDS, like convert_text_to_mds.py):
  prose  the help topics of `pydoc_data.topics` (the text of `help("if")` etc.), one document
         per topic
  code   the standard library's .py sources in sorted path order (no site-packages, no test
         suites, no files that are not UTF-8), up to --max-code-tokens tokens

Output: OUT/{prose,code}/{train,val}/ (MDS folders) and OUT/manifest.json (sizes and sources).
The content depends on the Python version, which the manifest records. A later "chat" stream
(pydoc topics turned into Q/A turns) would be one more entry in STREAMS, with its own writer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dbrx_train.data.prepare import pack_to_mds, prepare_output_folder, tokenize_documents

VAL_FRACTION = 0.05
MIN_VAL_SAMPLES = 8
SKIPPED_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def prose_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, topics[name]


def code_documents() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_STDLIB_PARTS.intersection(relative.parts[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately in other encodings
        yield relative.as_posix(), text


@dataclass
class StreamSource:
    description: str
    documents: Callable[[], Iterator[tuple[str, str]]]


STREAMS = {
    "prose": StreamSource(
        "pydoc_data.topics.topics: Python's help() topics, one document per topic", prose_documents
    ),
    "code": StreamSource(
        "the Python standard library's .py files, sorted by path, tests excluded", code_documents
    ),
}


def tokenize_capped(
    documents: Iterator[tuple[str, str]], *, max_tokens: int | None, num_workers: int
) -> list[tuple[str, np.ndarray]]:
    """(name, tokens + EOS) per document, in order, stopping once max_tokens is reached."""
    named = list(documents)
    token_arrays = tokenize_documents((text for _, text in named), num_workers=num_workers)
    result, total = [], 0
    try:
        for (name, _), tokens in zip(named, token_arrays, strict=True):
            result.append((name, tokens))
            total += len(tokens)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        token_arrays.close()  # stops the worker pool, which may be ahead of the cap
    return result


def split_train_val(
    stream: str, documents: list[tuple[str, np.ndarray]], max_seq_len: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Val takes the documents whose name hashes lowest until it holds VAL_FRACTION of the
    tokens and at least MIN_VAL_SAMPLES samples. Hashing names (not positions) keeps a
    document on the same side when other documents come or go."""
    total = sum(len(tokens) for _, tokens in documents)
    val_target = max(VAL_FRACTION * total, (MIN_VAL_SAMPLES + 1) * max_seq_len)
    by_hash = sorted(documents, key=lambda doc: hashlib.sha256(f"{stream}/{doc[0]}".encode()).digest())
    val_names, val_tokens = set(), 0
    for name, tokens in by_hash:
        if val_tokens >= val_target:
            break
        val_names.add(name)
        val_tokens += len(tokens)
    train = [tokens for name, tokens in documents if name not in val_names]
    val = [tokens for name, tokens in documents if name in val_names]
    if sum(map(len, train)) < val_tokens:
        raise ValueError(
            f"stream {stream!r}: only {total} tokens, too few for a train split next to a val split of "
            f"{MIN_VAL_SAMPLES} samples of {max_seq_len} tokens; raise the token cap or lower --max-seq-len"
        )
    return train, val


def build_default_corpus(
    out: Path, *, max_seq_len: int, max_code_tokens: int, num_workers: int, overwrite: bool
) -> dict:
    """Write every stream's train/val MDS folders under `out`; return the manifest."""
    folders = [out / stream / split for stream in STREAMS for split in ("train", "val")]
    for folder in folders:  # refuse (or clear) all of them before spending time tokenizing
        prepare_output_folder(folder, overwrite)
    caps = {"code": max_code_tokens}
    manifest = {
        "description": "Default dbrx-train pretraining corpus, built offline by data_prep/build_default_corpus.py",
        "python": platform.python_version(),
        "tokenizer": "cl100k_base + DBRX special tokens (dbrx_train.tokenizer), EOS after each document",
        "max_seq_len": max_seq_len,
        "streams": {},
    }
    for stream, source in STREAMS.items():
        documents = tokenize_capped(source.documents(), max_tokens=caps.get(stream), num_workers=num_workers)
        train, val = split_train_val(stream, documents, max_seq_len)
        entry: dict = {"source": source.description, "token_cap": caps.get(stream)}
        for split, arrays in (("train", train), ("val", val)):
            # Already tokenized: a progress bar here would only time the packing.
            summary = pack_to_mds(arrays, out / stream / split, max_seq_len=max_seq_len, progress=False)
            entry[split] = {
                "folder": f"{stream}/{split}",
                **{key: value for key, value in asdict(summary).items() if key != "seconds"},
            }
        manifest["streams"][stream] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/default", help="output folder (default: data/default)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens per sample (default: 256)")
    parser.add_argument(
        "--max-code-tokens", type=int, default=3_000_000, help="cap on the code stream (default: 3000000)"
    )
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing MDS folders under --out")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        manifest = build_default_corpus(
            Path(args.out),
            max_seq_len=args.max_seq_len,
            max_code_tokens=args.max_code_tokens,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"default corpus in {args.out} ({time.perf_counter() - start:.1f} s, Python {manifest['python']}):")
    for stream, entry in manifest["streams"].items():
        for split in ("train", "val"):
            info = entry[split]
            print(
                f"  {stream}/{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
                f"{info['samples']:,} samples of {args.max_seq_len}"
            )


if __name__ == "__main__":
    main()
