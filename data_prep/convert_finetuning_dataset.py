"""Tokenize chat / instruction .jsonl files into an MDS dataset for fine-tuning.

    python data_prep/convert_finetuning_dataset.py --input 'chats/*.jsonl' --out data/chat/train --max-seq-len 2048

Each line is one conversation, either {"prompt": "...", "response": "..."} or
{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. It is rendered in
DBRX's ChatML format (dbrx_train/data/chat.py) and written as `input_ids` and `labels`
(`ndarray:int32`, labels = -100 except on assistant turns and their <|im_end|>).

Longer than --max-seq-len: --truncation truncate (cut the end; default), skip, or error.
A bad row (invalid JSON, missing or empty fields, wrong types) stops the conversion with its
file and line, unless --skip-bad skips and counts it. --pack joins several conversations into
one sample (they then attend to earlier conversations in the row; see docs/data.md).
Special-token strings typed inside a message (`<|im_end|>`, ...) are encoded as plain text, as in
pretraining, and counted; --allow-special-tokens encodes them as control tokens instead.
"""

from __future__ import annotations

import argparse

from dbrx_train.data.finetuning import TRUNCATION_POLICIES, convert_finetuning_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl files, globs or folders")
    parser.add_argument("--out", required=True, help="output MDS folder (must be empty or absent)")
    parser.add_argument(
        "--max-seq-len", type=int, default=2048, help="tokens per sample at most (default: 2048)"
    )
    parser.add_argument(
        "--truncation", choices=TRUNCATION_POLICIES, default="truncate", help="for longer conversations"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")
    parser.add_argument("--pack", action="store_true", help="pack several conversations per sample")
    parser.add_argument(
        "--system-prompt",
        choices=("none", "default"),
        default="none",
        help="'default': insert DBRX's default system prompt where a conversation has none (~400 tokens)",
    )
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="special-token strings in message content (<|im_end|>, ...) become control tokens; by default they "
        "are plain text, so a message cannot forge a turn (their count is reported either way)",
    )
    parser.add_argument("--compression", default="zstd", help="shard compression, or 'none' (default: zstd)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MDS dataset in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = convert_finetuning_dataset(
            args.input,
            args.out,
            max_seq_len=args.max_seq_len,
            truncation=args.truncation,
            skip_bad=args.skip_bad,
            pack=args.pack,
            system_prompt=args.system_prompt == "default",
            allow_special_tokens=args.allow_special_tokens,
            compression=None if args.compression == "none" else args.compression,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:  # bad rows, inputs or --out: the message says what to do
        raise SystemExit(f"error: {error}") from None
    print(f"{args.out}: {summary.describe()}")


if __name__ == "__main__":
    main()
