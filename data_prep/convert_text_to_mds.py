"""Tokenize text files into an MDS dataset of fixed-length samples for pretraining.

    python data_prep/convert_text_to_mds.py --input 'corpus/*.jsonl' --out data/mine/train --max-seq-len 2048

Inputs: .txt (one document per file), .jsonl (one document per line, in --text-field),
.parquet (column --text-field); globs and folders are expanded and sorted. Each document is
followed by <|endoftext|> (--eos-text); the token stream is cut into samples of exactly
--max-seq-len tokens (the trailing partial sample is dropped) and written as LLM Foundry's
`tokens: ndarray:int32` column. Same inputs and options => byte-identical shards.

LLM Foundry's flags work too: --input_folder, --output_folder (or --out_root), --concat_tokens,
--processes, --bos_text, --eos_text, --use_tokenizer_eos, --no_wrap, --tokenizer (DBRX's),
--compression, --reprocess; --trust-remote-code and --logging-level change nothing here.
"""

from __future__ import annotations

import argparse
import os

from dbrx_train.config.foundry import dbrx_tokenizer_problem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", "--input_folder", nargs="+", required=True, help="files, globs or folders")
    parser.add_argument(
        "--out",
        "--output_folder",
        "--out_root",
        required=True,
        help="output MDS folder (must be empty or absent)",
    )
    parser.add_argument(
        "--max-seq-len",
        "--concat_tokens",
        type=int,
        default=256,
        help="tokens per sample: documents are concatenated and cut into samples of this length (default: 256)",
    )
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column (default: text)")
    parser.add_argument("--compression", default="zstd", help="shard compression, or 'none' (default: zstd)")
    parser.add_argument("--size-limit", default="64mb", help="uncompressed bytes per shard (default: 64mb)")
    parser.add_argument(
        "--num-workers",
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer threads (default: all cores)",
    )
    parser.add_argument(
        "--bos-text", "--bos_text", default="", help="text before each document (default: none)"
    )
    parser.add_argument(
        "--eos-text",
        "--eos_text",
        default="<|endoftext|>",
        help="text after each document (default: <|endoftext|>)",
    )
    parser.add_argument(
        "--use_tokenizer_eos",
        action="store_true",
        help="end documents with the tokenizer's <|endoftext|> (the default)",
    )
    parser.add_argument(
        "--no-wrap",
        "--no_wrap",
        action="store_true",
        help="drop the rest of a document that fills a sample instead of starting the next sample with it",
    )
    parser.add_argument("--tokenizer", default="dbrx", help="DBRX's tokenizer only (dbrx, databricks/dbrx-*)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MDS dataset in --out")
    parser.add_argument("--reprocess", type=_truth, default=False, help="LLM Foundry's: true = --overwrite")
    parser.add_argument("--trust-remote-code", type=_truth, default=False, help=argparse.SUPPRESS)
    parser.add_argument("--logging-level", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = dbrx_tokenizer_problem(args.tokenizer, "--tokenizer")
    if problem:
        parser.error(problem)
    if args.use_tokenizer_eos:
        args.eos_text = "<|endoftext|>"
    args.overwrite = args.overwrite or args.reprocess
    return args


def _truth(value: str) -> bool:
    """LLM Foundry's `type=bool` flags take a value: true/false."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dbrx_train.data.prepare import convert_text_to_mds  # after --help: it imports Streaming and torch

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
            bos_text=args.bos_text,
            eos_text=args.eos_text,
            wrap=not args.no_wrap,
        )
    except (OSError, ValueError) as error:  # bad inputs or --out: the message says what to do
        raise SystemExit(f"error: {error}") from None
    print(f"{args.out}: {summary.describe()}")


if __name__ == "__main__":
    main()
