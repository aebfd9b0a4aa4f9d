"""Fine-tuning data: conversations -> token ids + labels that train only on assistant turns.

    .jsonl rows  {"prompt": str, "response": str}
             or  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
      -> ChatML ids (`dbrx_train.data.chat`, the one definition of the format) and a per-token mask
      -> MDS samples `input_ids` / `labels` (both `ndarray:int32`, same length <= max_seq_len;
         labels = input_ids where trained, -100 elsewhere)
      -> the loader pads each sample to max_seq_len (pad id, labels -100): `(B, T)` batches, with
         `sequence_id` (B, T): 0, 1, ... for the conversations of a row, -1 on padding.

Padding needs no attention mask: the model is causal, so pad tokens *after* a sample are never
seen by it, their labels are -100, and `sequence_id` -1 keeps them out of the router statistics.
With packing (`pack=True` when converting), several conversations share a row and the samples get a
`sequence_id` column (`ndarray:int32`, the conversation of each token); the model then keeps each
conversation to itself (attention, RoPE positions, targets: model.attn_config.attn_uses_sequence_id,
on by default), so a packed conversation trains exactly as it would alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from streaming import StreamingDataLoader
from torch.utils.data import default_collate
from tqdm import tqdm

from dbrx_train.atomic import replacing
from dbrx_train.data.chat import validate_messages
from dbrx_train.data.integrity import ShardReadError, at_most_size, check_shard_files
from dbrx_train.data.prepare import MDS_DATASET, expand_inputs
from dbrx_train.data.text import (
    ModelSampleDataset,
    TextDatasetConfig,
    build_streaming_loader,
    check_local_streams,
)
from dbrx_train.data.token_mds import iter_samples, read_index, write_mds
from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer
from dbrx_train.vocab import DBRX_VOCAB_SIZE, IGNORE_INDEX, PAD_TOKEN_ID

COLUMNS = {"input_ids": "ndarray:int32", "labels": "ndarray:int32"}
SEQUENCE_ID = "sequence_id"  # packed samples only: the conversation (0, 1, ...) of each token
PACKED_COLUMNS = {**COLUMNS, SEQUENCE_ID: "ndarray:int32"}
TRUNCATION_POLICIES = ("truncate", "skip", "error")
HOW_TO_MAKE_CHAT_DATA = (
    "Create it with `python data_prep/convert_finetuning_dataset.py --input FILE.jsonl --out DIR "
    "--max-seq-len N`, or run `make data` for the default chat set (data/default/chat)."
)


@dataclass
class HFKwargsConfig:
    """``dataset.hf_kwargs:`` which files of `hf_name` to read (the keys of `datasets.load_dataset` that
    mean something without a download)."""

    # Files (globs) relative to hf_name's folder (or data_dir): a list, or {split: files}; null: every
    # .jsonl/.json/.parquet file, those named after `split` if any are (HF's convention: train-*.parquet).
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    data_dir: str | None = None  # a subfolder of hf_name (or, with hf_name json/parquet, the folder) to read


@dataclass
class FinetuningDatasetConfig(TextDatasetConfig):
    """``dataset:`` of a fine-tuning loader: MDS folders (local/streams, as for `text`), or LLM Foundry's
    `hf_name` pointing at local .jsonl/.parquet files, tokenized when the run starts."""

    # A local .jsonl/.json/.parquet file or folder of them (or `json`/`parquet` with hf_kwargs), one
    # conversation per row: prompt/response or messages. Tokenized once, by local rank 0, into a cache keyed
    # by the files and these options (the other ranks wait). Exclusive with local/streams. A Hugging Face
    # Hub id cannot be downloaded here.
    hf_name: str | None = None
    hf_kwargs: HFKwargsConfig = field(default_factory=HFKwargsConfig)  # which files of hf_name to read
    # LLM Foundry's switch between decoder-only and encoder-decoder formatting; DBRX is decoder-only: true.
    decoder_only_format: bool = True
    # Trim each batch to its longest sample rather than padding every sample to max_seq_len (less compute
    # on short conversations; the batch shape then varies).
    allow_pad_trimming: bool = False
    # hf_name only. null: one conversation per sample. auto: as many whole conversations per sample as fit
    # in max_seq_len, in order, none dropped (the ratio reached and the padding left are reported). A number
    # r: at most ceil(r) conversations per sample. Packed rows carry sequence_id: with
    # model.attn_config.attn_uses_sequence_id (the default) each conversation attends only to itself.
    packing_ratio: float | Literal["auto"] | None = None
    # hf_name only. Which assistant turns are trained: all (ours: every answer of a multi-turn conversation
    # is a target, as data_prep/convert_finetuning_dataset.py makes them) or last (LLM Foundry's default).
    target_responses: Literal["all", "last"] = "all"
    target_prompts: Literal["none"] = "none"  # hf_name only. Prompts are never trained (Foundry's default)
    # hf_name only. false: a bad row stops the run with its file:line; true: bad rows are skipped and counted.
    skip_bad_rows: bool = False
    cache_dir: str | None = None  # hf_name only. Where tokenized data is kept; null: ~/.cache/dbrx-train

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not self.decoder_only_format:
            found.append(("decoder_only_format", "must be true: DBRX is a decoder-only model"))
        if self.hf_name is not None and (self.local is not None or self.streams is not None):
            found.append(
                ("hf_name", "reads files; give either hf_name or local/streams (MDS folders), not both")
            )
        if isinstance(self.packing_ratio, float) and self.packing_ratio < 1:
            found.append(
                (
                    "packing_ratio",
                    f"must be >= 1 (conversations per sample) or auto; got {self.packing_ratio}",
                )
            )
        if self.hf_name is None:
            defaults = FinetuningDatasetConfig()
            for key in ("packing_ratio", "target_responses", "skip_bad_rows", "cache_dir"):
                if getattr(self, key) != getattr(defaults, key):
                    found.append(
                        (
                            key,
                            "applies to hf_name files, tokenized when the run starts; MDS data is "
                            "packed and masked when converted (data_prep/convert_finetuning_dataset.py)",
                        )
                    )
        return found


@dataclass
class FinetuningLoaderConfig:
    """``train_loader: {name: finetuning, dataset: {...}}``: MDS folders or LLM Foundry's hf_name files."""

    # Conversations (MDS `input_ids` + `labels`), padded to max_seq_len; loss on assistant turns only.
    name: Literal["finetuning"] = "finetuning"
    dataset: FinetuningDatasetConfig = field(default_factory=FinetuningDatasetConfig)
    drop_last: bool = True  # drop an epoch's last incomplete device batch
    num_workers: int = 0  # DataLoader worker processes; 0: load in the training process
    pin_memory: bool = False  # put batches in page-locked memory (faster copies to the GPU)
    prefetch_factor: int | None = None  # batches each worker loads ahead; only with num_workers > 0
    persistent_workers: bool = False  # keep workers alive between epochs; only with num_workers > 0
    timeout: float = 0.0  # seconds to wait for a batch from a worker; 0: no limit


# ---------------------------------------------------------------------------------------------
# Rows -> conversations
# ---------------------------------------------------------------------------------------------
class BadRow(ValueError):
    """A row that cannot become a training sample; the message starts with 'file:line:'."""


def row_messages(record: Any) -> list[dict]:
    """The conversation of one .jsonl row, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        validate_messages(messages)
        for i, message in enumerate(messages):
            if not message["content"].strip():
                raise ValueError(f"messages[{i}]['content'] is only whitespace")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("messages has no assistant turn, so there is nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"has 'prompt'/'response' but no {key!r}")
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
            if not record[key].strip():
                raise ValueError(f"{key!r} is empty")
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise ValueError(f"expected 'messages' or 'prompt' and 'response'; got keys {sorted(record)}")


CONVERSATION_SUFFIXES = (".jsonl", ".json", ".parquet")


def iter_file_conversations(paths: Iterable[Path]) -> Iterator[tuple[str, list[dict] | BadRow]]:
    """(where, conversation) per row of .jsonl/.json (JSON lines) or .parquet files, in file then row
    order; a bad row yields its BadRow (`file:line`, `file:row N`) instead of raising, so the caller
    decides between stopping and skipping."""
    for path in paths:
        if path.suffix == ".parquet":
            yield from _parquet_conversations(path)
        elif path.suffix in (".jsonl", ".json"):
            yield from iter_jsonl_conversations([path])
        else:
            raise ValueError(f"{path}: fine-tuning data must be .jsonl, .json (JSON lines) or .parquet")


def _parquet_conversations(path: Path) -> Iterator[tuple[str, list[dict] | BadRow]]:
    import pyarrow.parquet as pq  # only for .parquet input

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                where = f"{path}:row {row}"
                try:
                    yield where, row_messages(record)
                except ValueError as error:
                    yield where, BadRow(f"{where}: {error}")
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable parquet file ({error})") from None


def iter_jsonl_conversations(paths: Iterable[Path]) -> Iterator[tuple[str, list[dict] | BadRow]]:
    """(where, conversation) per non-blank line, in file then line order; a bad line yields its
    BadRow instead of raising, so the caller decides between stopping and skipping."""
    for path in paths:
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"{path}: fine-tuning data must be .jsonl (one conversation per line)")
        with path.open("rb") as lines:
            for line_number, raw in enumerate(lines, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    yield where, row_messages(json.loads(line))
                except UnicodeDecodeError as error:
                    yield where, BadRow(f"{where}: not UTF-8 text ({error})")
                except json.JSONDecodeError as error:
                    yield where, BadRow(f"{where}: not valid JSON ({error.msg})")
                except ValueError as error:
                    yield where, BadRow(f"{where}: {error}")


# ---------------------------------------------------------------------------------------------
# Conversations -> samples
# ---------------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX where not trained
    special_strings: int = 0  # special-token strings found in the messages' content
    sequence_id: np.ndarray | None = None  # (T,) int32 packed rows: the conversation of each token

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_conversation(
    tokenizer: DbrxTokenizer,
    messages: list[dict],
    *,
    system_prompt: bool,
    allow_special_tokens: bool = False,
    last_response_only: bool = False,
) -> Example:
    """ChatML ids; labels on every assistant turn, or (`last_response_only`) on the last one.
    Special-token strings in a message's content (`<|im_end|>`, ...) are text unless
    `allow_special_tokens`; either way the example counts them (`special_strings`)."""
    ids, trainable = tokenizer.encode_chat(
        messages, default_system_prompt=system_prompt, allow_special_in_content=allow_special_tokens
    )
    input_ids = np.array(ids, np.int32)
    targets = np.array(trainable, bool)
    if last_response_only and targets.any():
        # The last assistant turn is the last run of targets: everything before it is context.
        start = len(targets) - int(np.argmax(targets[::-1]))  # one past the last target
        while start > 0 and targets[start - 1]:
            start -= 1
        targets[:start] = False
    labels = np.where(targets, input_ids, IGNORE_INDEX).astype(np.int32)
    special = sum(tokenizer.count_special(m["content"]) for m in messages)
    return Example(input_ids, labels, special)


def fit_length(example: Example, max_seq_len: int, truncation: str, where: str) -> Example | None:
    """Apply the truncation policy: the example, a right-truncated copy, None (skip), or an error."""
    if len(example.input_ids) <= max_seq_len:
        return example
    message = f"{where}: {len(example.input_ids)} tokens, more than --max-seq-len {max_seq_len}"
    if truncation == "error":
        raise BadRow(f"{message} (--truncation error; use truncate or skip)")
    if truncation == "skip":
        return None
    cut = Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
    # Position 0 is never a target (nothing precedes it), so it does not count.
    if (cut.labels[1:] == IGNORE_INDEX).all():
        raise BadRow(f"{message}, and truncating it leaves no assistant token to train on")
    return cut


def pack_examples(
    examples: Iterable[Example], max_seq_len: int, max_per_row: int | None = None
) -> Iterator[Example]:
    """Greedy, in order: append each example to the current row while it fits (and the row holds
    fewer than `max_per_row`), else start a new one. Nothing is dropped."""
    row: list[Example] = []
    length = 0
    for example in examples:
        full = max_per_row is not None and len(row) >= max_per_row
        if row and (full or length + len(example.input_ids) > max_seq_len):
            yield _join(row)
            row, length = [], 0
        row.append(example)
        length += len(example.input_ids)
    if row:
        yield _join(row)


def _join(examples: list[Example]) -> Example:
    return Example(
        np.concatenate([e.input_ids for e in examples]),
        np.concatenate([e.labels for e in examples]),
        special_strings=sum(e.special_strings for e in examples),
        sequence_id=np.concatenate([np.full(len(e.input_ids), i, np.int32) for i, e in enumerate(examples)]),
    )


def find_sample_problem(
    input_ids: np.ndarray,
    labels: np.ndarray,
    max_seq_len: int,
    vocab_size: int,
    sequence_id: np.ndarray | None = None,
) -> str | None:
    """Why this (input_ids, labels[, sequence_id]) sample cannot train a model with this max_seq_len
    and vocab."""
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        return (
            f"has input_ids of shape {input_ids.shape} but labels of shape {labels.shape}; both must be (T,)"
        )
    if not np.issubdtype(input_ids.dtype, np.integer) or not np.issubdtype(labels.dtype, np.signedinteger):
        return (
            f"has input_ids of dtype {input_ids.dtype} and labels of dtype {labels.dtype}; both must be signed "
            f"integers (ndarray:int32). Re-convert it with data_prep/convert_finetuning_dataset.py"
        )
    if len(input_ids) == 0:
        return "is empty"
    if len(input_ids) > max_seq_len:
        return (
            f"has {len(input_ids)} tokens, more than max_seq_len={max_seq_len}. Re-prepare it with "
            f"`--max-seq-len {max_seq_len}` or raise max_seq_len"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        return f"has token id {low if low < 0 else high}, outside [0, vocab_size={vocab_size})"
    trained = labels != IGNORE_INDEX
    if (labels[trained] != input_ids[trained]).any():
        return "has labels that are neither -100 nor the token at the same position"
    if not trained[1:].any():
        return "has no trained position (every label is -100)"
    if sequence_id is not None:
        steps = np.diff(sequence_id.astype(np.int64))
        if sequence_id.shape != input_ids.shape or sequence_id[0] != 0 or not np.isin(steps, (0, 1)).all():
            return (
                f"has a {SEQUENCE_ID} column that does not number its conversations 0, 1, ... in order, one id "
                f"per token ({len(sequence_id)} ids for {len(input_ids)} tokens)"
            )
    return None


@dataclass
class ConvertSummary:
    rows: int = 0  # conversations read, good or bad
    samples: int = 0  # MDS samples written (fewer than rows when packing)
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # the first few skipped rows' messages
    seconds: float = 0.0
    max_seq_len: int = 0
    special_strings: int = 0  # special-token strings in message content (`<|im_end|>`, ...)
    special_allowed: bool = False  # they were encoded as control tokens (--allow-special-tokens)

    @property
    def packing_ratio(self) -> float:
        """Conversations per sample."""
        return (self.rows - self.skipped_bad - self.skipped_too_long) / max(self.samples, 1)

    @property
    def padding(self) -> float:
        """The share of (samples x max_seq_len) positions that will be padding."""
        return 1 - self.tokens / max(self.samples * self.max_seq_len, 1)

    def describe(self) -> str:
        text = (
            f"{self.rows:,} conversations -> {self.samples:,} samples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained); {self.truncated} truncated, {self.skipped_too_long} "
            f"skipped as too long, {self.skipped_bad} bad rows skipped, in {self.seconds:.1f} s; "
            f"{self.packing_ratio:.2f} conversations per sample, {100 * self.padding:.0f}% padding at "
            f"max_seq_len {self.max_seq_len}"
        )
        lines = [text, *(f"  skipped: {m}" for m in self.bad_examples)]
        if self.special_strings:
            how = (
                "encoded as control tokens (--allow-special-tokens)"
                if self.special_allowed
                else "encoded as plain text (--allow-special-tokens would make them control tokens)"
            )
            lines.append(
                f"  {self.special_strings:,} special-token strings (<|im_end|>, ...) in message content, {how}"
            )
        return "\n".join(lines)


def convert_conversations(
    conversations: Iterable[tuple[str, list[dict] | BadRow]],
    out: str | Path,
    *,
    max_seq_len: int,
    truncation: str = "truncate",
    skip_bad: bool = False,
    skip_hint: str = "pass --skip-bad",
    pack: bool = False,
    max_per_row: int | None = None,
    last_response_only: bool = False,
    system_prompt: bool = False,
    allow_special_tokens: bool = False,
    overwrite: bool = False,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
    vocab_size: int = DBRX_VOCAB_SIZE,
    inputs: Sequence[Path] = (),
) -> ConvertSummary:
    """Tokenize (where, messages) pairs into a fine-tuning MDS dataset, re-read it, and only then put it
    in `out` (replacing an old one with `overwrite`; on any error `out` is left as it was). `inputs`: the
    files the conversations come from, which must not lie in `out`.
    `system_prompt`: insert DBRX's default system prompt where a conversation has none. `pack`: whole
    conversations share samples (at most `max_per_row` each). `last_response_only`: train only each
    conversation's last assistant turn.
    `allow_special_tokens`: special-token strings in message content become control tokens (else text)."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    out = Path(out)
    summary = ConvertSummary(max_seq_len=max_seq_len, special_allowed=allow_special_tokens)
    options = dict(
        max_seq_len=max_seq_len,
        truncation=truncation,
        skip_bad=skip_bad,
        skip_hint=skip_hint,
        pack=pack,
        max_per_row=max_per_row,
        last_response_only=last_response_only,
    )
    with replacing(out, overwrite=overwrite, kind=MDS_DATASET, inputs=inputs) as tmp:
        _write_conversations(
            conversations,
            tmp,
            out,
            summary,
            system_prompt=system_prompt,
            compression=compression,
            size_limit=size_limit,
            vocab_size=vocab_size,
            **options,
        )
    return summary


def _write_conversations(
    conversations: Iterable[tuple[str, list[dict] | BadRow]],
    tmp: Path,
    out: Path,
    summary: ConvertSummary,
    *,
    max_seq_len: int,
    truncation: str,
    skip_bad: bool,
    skip_hint: str,
    pack: bool,
    max_per_row: int | None,
    last_response_only: bool,
    system_prompt: bool,
    compression: str | None,
    size_limit: int | str,
    vocab_size: int,
) -> None:
    """Into `tmp` (swapped into `out` by the caller), counting into `summary`."""
    tokenizer = load_tokenizer()
    allow_special_tokens = summary.special_allowed
    start = time.perf_counter()

    def examples() -> Iterator[Example]:
        for where, messages in conversations:
            summary.rows += 1
            try:
                if isinstance(messages, BadRow):
                    raise messages
                example = tokenize_conversation(
                    tokenizer,
                    messages,
                    system_prompt=system_prompt,
                    allow_special_tokens=allow_special_tokens,
                    last_response_only=last_response_only,
                )
                summary.special_strings += example.special_strings
                fitted = fit_length(example, max_seq_len, truncation, where)
            except BadRow as error:
                if not skip_bad:
                    raise BadRow(f"{error} ({skip_hint} to skip and count such rows)") from None
                summary.skipped_bad += 1
                if len(summary.bad_examples) < 5:
                    summary.bad_examples.append(str(error))
                continue
            if fitted is None:
                summary.skipped_too_long += 1
                continue
            summary.truncated += fitted is not example
            yield fitted

    def samples() -> Iterator[dict[str, np.ndarray]]:
        rows = pack_examples(examples(), max_seq_len, max_per_row) if pack else examples()
        for example in tqdm(rows, desc="fine-tuning samples", unit=" samples", disable=None):
            summary.tokens += len(example.input_ids)
            summary.trained_tokens += example.trained_tokens
            sample = {"input_ids": example.input_ids, "labels": example.labels}
            yield {**sample, SEQUENCE_ID: example.sequence_id} if pack else sample

    columns = PACKED_COLUMNS if pack else COLUMNS
    summary.samples = write_mds(samples(), tmp, columns, compression=compression, size_limit=size_limit)
    summary.seconds = time.perf_counter() - start
    if summary.samples == 0:
        raise ValueError(f"no usable conversation among {summary.rows} rows; nothing was written to {out}")
    written = check_finetuning_mds(
        tmp, max_seq_len=max_seq_len, vocab_size=vocab_size, name="output", all_samples=True
    )
    if written.num_samples != summary.samples:
        raise RuntimeError(
            f"{out}: wrote {summary.samples} samples but its index lists {written.num_samples}"
        )


def convert_finetuning_dataset(inputs: Sequence[str], out: str | Path, **options: Any) -> ConvertSummary:
    """.jsonl/.parquet files/globs/folders of conversations -> one fine-tuning MDS dataset in `out`."""
    paths = [p for p in expand_inputs(inputs) if p.suffix in (".jsonl", ".parquet")]
    if not paths:
        raise FileNotFoundError(f"--input {list(inputs)} holds no .jsonl or .parquet file")
    return convert_conversations(iter_file_conversations(paths), out, inputs=paths, **options)


# ---------------------------------------------------------------------------------------------
# Checks and the training dataset
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuningMDSInfo:
    folder: Path
    num_samples: int
    max_length: int  # over the checked samples


def check_finetuning_mds(
    folder: str | Path,
    *,
    max_seq_len: int,
    vocab_size: int,
    name: str = "dataset",
    all_samples: bool = False,
    verify_shards: str = "size",
    remote: bool = False,
) -> FinetuningMDSInfo:
    """Index, columns, shard files (`verify_shards`, see data/integrity.py) and the first sample of
    each shard (or every sample, with `all_samples` or `full`) of a local folder."""
    folder = Path(folder)
    index = read_index(folder, name, columns=tuple(COLUMNS), signed=("labels",), how_to=HOW_TO_MAKE_CHAT_DATA)
    check_shard_files(folder, index, name, verify_shards, remote=remote)
    max_length = 0
    limit = None if all_samples or verify_shards == "full" else 1
    for location, sample in iter_samples(folder, index["shards"], name, limit_per_shard=limit):
        input_ids, labels = np.asarray(sample["input_ids"]), np.asarray(sample["labels"])
        sequence_id = np.asarray(sample[SEQUENCE_ID]) if SEQUENCE_ID in sample else None
        problem = find_sample_problem(input_ids, labels, max_seq_len, vocab_size, sequence_id)
        if problem:
            raise ValueError(f"{name}: {location} in {folder} {problem}.")
        max_length = max(max_length, len(input_ids))
    return FinetuningMDSInfo(folder, sum(s["samples"] for s in index["shards"]), max_length)


def validate_finetuning_dataset_config(
    cfg: FinetuningLoaderConfig,
    max_seq_len: int,
    vocab_size: int,
    *,
    config_key: str = "train_loader",
    verify_shards: str | None = None,
) -> dict[str, FinetuningMDSInfo]:
    """Like `validate_text_dataset_config`, for fine-tuning MDS folders."""
    if cfg.name != "finetuning":
        raise ValueError(f"{config_key}.name is {cfg.name!r}; the fine-tuning loader is 'finetuning'")
    if cfg.dataset.eos_token_id is not None:
        raise ValueError(
            f"{config_key}.dataset.eos_token_id splits pretraining rows into documents; fine-tuning samples "
            "carry their conversations' sequence ids (packed with --pack). Remove it"
        )
    return check_local_streams(cfg, check_finetuning_mds, max_seq_len, vocab_size, config_key, verify_shards)


class FinetuningDataset(ModelSampleDataset):
    """Samples padded to max_seq_len: `input_ids` (pad id after the sample), `labels` (-100 there) and
    `sequence_id` (the sample's own column when packed, else 0; -1 on padding)."""

    def get_item(self, idx: int, retry: int = 7) -> dict[str, torch.Tensor]:
        sample = super().get_item(idx, retry)
        if "input_ids" not in sample or "labels" not in sample:
            raise ShardReadError(
                f"{self.describe_sample(idx)} has columns {sorted(sample)}, but fine-tuning "
                f"data needs {list(COLUMNS)}. {HOW_TO_MAKE_CHAT_DATA}"
            )
        input_ids, labels = np.asarray(sample["input_ids"]), np.asarray(sample["labels"])
        sequence_id = np.asarray(sample[SEQUENCE_ID]) if SEQUENCE_ID in sample else None
        problem = find_sample_problem(input_ids, labels, self.max_seq_len, self.vocab_size, sequence_id)
        if problem:
            raise ShardReadError(f"{self.describe_sample(idx)} {problem}.")
        padded_ids = np.full(self.max_seq_len, PAD_TOKEN_ID, np.int64)
        padded_labels = np.full(self.max_seq_len, IGNORE_INDEX, np.int64)
        padded_sequence_id = np.full(self.max_seq_len, -1, np.int64)
        padded_ids[: len(input_ids)] = input_ids
        padded_labels[: len(labels)] = labels
        padded_sequence_id[: len(input_ids)] = 0 if sequence_id is None else sequence_id
        return {
            "input_ids": torch.from_numpy(padded_ids),
            "labels": torch.from_numpy(padded_labels),
            SEQUENCE_ID: torch.from_numpy(padded_sequence_id),
            **self.provenance(idx),
        }


def build_finetuning_dataloader(
    cfg: FinetuningLoaderConfig,
    *,
    device_batch_size: int,
    max_seq_len: int,
    vocab_size: int,
    seed: int,
    config_key: str = "train_loader",
    choose: dict[str, int] | None = None,
) -> StreamingDataLoader:
    """Batches of `input_ids`/`labels`/`sequence_id` (B, max_seq_len) int64 and `stream_id` (B,)."""
    validate_finetuning_dataset_config(
        cfg,
        max_seq_len,
        vocab_size,
        config_key=config_key,
        verify_shards=at_most_size(cfg.dataset.verify_shards),
    )
    return build_streaming_loader(
        cfg,
        FinetuningDataset,
        {"max_seq_len": max_seq_len, "vocab_size": vocab_size},
        device_batch_size=device_batch_size,
        seed=seed,
        config_key=config_key,
        choose=choose,
        collate_fn=trim_padding if cfg.dataset.allow_pad_trimming else None,
    )


def trim_padding(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The default batch, cut after the last column that is not padding in some sample (a
    conversation ends with <|im_end|>, never with the pad id)."""
    batch = default_collate(samples)
    used = (batch["input_ids"] != PAD_TOKEN_ID).any(dim=0).nonzero()
    keep = int(used.max()) + 1 if len(used) else 1
    for name in ("input_ids", "labels", SEQUENCE_ID):
        batch[name] = batch[name][:, :keep]
    return batch
