"""Tokenize chat / instruction files into an MDS dataset for fine-tuning.

    python data_prep/convert_finetuning_dataset.py --input 'chats/*.jsonl' --out data/chat/train --max-seq-len 2048

Each .jsonl line (or .parquet row) is one conversation, either {"prompt": "...", "response": "..."}
or {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. It is rendered in
DBRX's ChatML format (dbrx_train/data/chat.py) and written as `input_ids` and `labels`
(`ndarray:int32`, labels = -100 except on assistant turns and their <|im_end|>; with
--target-responses last, only on the last one).

Longer than --max-seq-len: --truncation truncate (cut the end; default), skip, or error.
A bad row (invalid JSON, missing or empty fields, wrong types) stops the conversion with its
file and line, unless --skip-bad skips and counts it. --pack joins several conversations into
one sample, with a sequence_id column that keeps each conversation to itself (see docs/data.md).
Special-token strings typed inside a message (`<|im_end|>`, ...) are encoded as plain text, as in
pretraining, and counted; --allow-special-tokens encodes them as control tokens instead.

LLM Foundry's flags work too: --dataset (a local folder or file) with --splits and --out_root
(one dataset per split in OUT_ROOT/<split>, the files of each split found by their names as
`datasets.load_dataset` finds them, or given by --data_files, one per split), --max_seq_len,
--tokenizer (DBRX's), --target_prompts none, --target_responses, --compression; --num_workers,
--tokenizer_kwargs and --skip-preprocessing change nothing here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dbrx_train.config.foundry import dbrx_tokenizer_problem

# LLM Foundry's flags with no equivalent here, and what to use instead.
UNSUPPORTED = {
    "--preprocessor": "rows must hold prompt/response or messages: convert other shapes to .jsonl first",
    "--data_subset": "pick the subset's files with --data_files or --input",
    "--encoder_decoder": "DBRX is decoder-only",
    "--local": "--out is a local folder; copy it to an object store yourself",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", help=".jsonl/.parquet files, globs or folders")
    parser.add_argument("--out", help="output MDS folder (must be empty or absent)")
    parser.add_argument("--dataset", help="LLM Foundry's: a local folder or file holding the splits")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"], help="with --dataset")
    parser.add_argument("--data_files", nargs="+", help="with --dataset: the files of each split, in order")
    parser.add_argument("--out_root", help="with --dataset: each split goes to OUT_ROOT/<split>")
    parser.add_argument(
        "--max-seq-len",
        "--max_seq_len",
        type=int,
        default=2048,
        help="tokens per sample at most (default: 2048)",
    )
    parser.add_argument(
        "--truncation", default="truncate", help="for longer conversations: truncate, skip or error"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")
    parser.add_argument("--pack", action="store_true", help="pack several conversations per sample")
    parser.add_argument(
        "--target-responses",
        "--target_responses",
        choices=("all", "last"),
        default="all",
        help="train every assistant turn (default) or only the last (LLM Foundry's default)",
    )
    parser.add_argument(
        "--target_prompts", choices=("none",), default="none", help="prompts are never trained"
    )
    parser.add_argument(
        "--system-prompt",
        choices=("none", "default"),
        default="none",
        help="'default': insert DBRX's default system prompt where a conversation has none (~400 tokens)",
    )
    parser.add_argument("--tokenizer", default="dbrx", help="DBRX's tokenizer only (dbrx, databricks/dbrx-*)")
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="special-token strings in message content (<|im_end|>, ...) become control tokens; by default they "
        "are plain text, so a message cannot forge a turn (their count is reported either way)",
    )
    parser.add_argument("--compression", default="zstd", help="shard compression, or 'none' (default: zstd)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MDS dataset in --out")
    for flag in ("--num_workers", "--tokenizer_kwargs"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--skip-preprocessing", action="store_true", help=argparse.SUPPRESS)
    for flag in UNSUPPORTED:
        parser.add_argument(flag, nargs="?", const=True, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, instead in UNSUPPORTED.items():
        if getattr(args, flag.lstrip("-")) is not None:
            parser.error(f"{flag} (LLM Foundry) has no equivalent here: {instead}")
    problem = dbrx_tokenizer_problem(args.tokenizer, "--tokenizer")
    if problem:
        parser.error(problem)
    if args.dataset is None and (args.input is None or args.out is None):
        parser.error("give --input and --out (or LLM Foundry's --dataset and --out_root)")
    if args.dataset is not None and (args.input is not None or args.out_root is None):
        parser.error("--dataset goes with --out_root (and --splits), not with --input")
    if args.data_files and len(args.data_files) != len(args.splits):
        parser.error(f"--data_files gives {len(args.data_files)} files for {len(args.splits)} --splits")
    return args


def jobs(args: argparse.Namespace) -> list[tuple[list[str], str]]:
    """(input files, output folder) per dataset to write."""
    if args.dataset is None:
        return [(args.input, args.out)]
    if args.data_files:
        return [([f], str(Path(args.out_root, s))) for f, s in zip(args.data_files, args.splits, strict=True)]
    from dbrx_train.data.finetuning_files import FileDataError, split_files

    root = Path(args.dataset)
    if root.is_file():
        return [([str(root)], str(Path(args.out_root, args.splits[0])))]
    if not root.is_dir():
        raise FileDataError(
            f"--dataset {args.dataset!r} is not a local folder or file; nothing is downloaded here: download "
            "the dataset's files where the hub is reachable and give that folder"
        )
    return [
        ([str(p) for p in split_files(root, s, "--dataset")], str(Path(args.out_root, s)))
        for s in args.splits
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # After --help and the flag checks: these import Streaming and torch.
    from dbrx_train.data.finetuning import convert_finetuning_dataset

    try:
        for inputs, out in jobs(args):
            summary = convert_finetuning_dataset(
                inputs,
                out,
                max_seq_len=args.max_seq_len,
                truncation=args.truncation,
                skip_bad=args.skip_bad,
                pack=args.pack,
                last_response_only=args.target_responses == "last",
                system_prompt=args.system_prompt == "default",
                allow_special_tokens=args.allow_special_tokens,
                compression=None if args.compression == "none" else args.compression,
                overwrite=args.overwrite,
            )
            print(f"{out}: {summary.describe()}")
    except (OSError, ValueError) as error:  # bad rows, inputs or --out: the message says what to do
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
