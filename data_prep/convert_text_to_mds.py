"""Tokenize text files into an MDS dataset of fixed-length samples for pretraining.

    python data_prep/convert_text_to_mds.py --input 'corpus/*.jsonl' --out data/mine/train --max-seq-len 2048

Inputs: .txt (one document per file), .jsonl (one document per line, in --text-field),
.parquet (column --text-field); globs and folders are expanded and sorted. Each document is
followed by <|endoftext|>; the token stream is cut into samples of exactly --max-seq-len
tokens (the trailing partial sample is dropped) and written as LLM Foundry's
`tokens: ndarray:int32` column. Same inputs and options => byte-identical shards.
"""

from __future__ import annotations

import argparse
import os

from dbrx_train.data.prepare import convert_text_to_mds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, globs or folders")
    parser.add_argument("--out", required=True, help="output MDS folder (must be empty or absent)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens per sample (default: 256)")
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column (default: text)")
    parser.add_argument("--compression", default="zstd", help="shard compression, or 'none' (default: zstd)")
    parser.add_argument("--size-limit", default="64mb", help="uncompressed bytes per shard (default: 64mb)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer threads (default: all cores)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MDS dataset in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = convert_text_to_mds(
            args.input,
            args.out,
            max_seq_len=args.max_seq_len,
            text_field=args.text_field,
            num_workers=args.num_workers,
            compression=None if args.compression == "none" else args.compression,
            size_limit=args.size_limit,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:  # bad inputs or --out: the message says what to do
        raise SystemExit(f"error: {error}") from None
    print(f"{args.out}: {summary.describe()}")


if __name__ == "__main__":
    main()
