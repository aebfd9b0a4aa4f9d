"""Fine-tuning data: conversations -> token ids + labels that train only on assistant turns.

    .jsonl rows  {"prompt": str, "response": str}
             or  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
      -> ChatML ids (`dbrx_train.data.chat`, the one definition of the format) and a per-token mask
      -> MDS samples `input_ids` / `labels` (both `ndarray:int32`, same length <= max_seq_len;
         labels = input_ids where trained, -100 elsewhere)
      -> the loader pads each sample to max_seq_len (pad id, labels -100): `(B, T)` batches.

Padding needs no attention mask: the model is causal, so pad tokens *after* a sample are never
seen by it, and their labels are -100. With packing (`pack=True` when converting), several
conversations share a row; each still trains only on its own assistant turns, but attends to
the conversations before it in the row (the model has no block-diagonal mask).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from streaming import MDSWriter, StreamingDataLoader
from tqdm import tqdm

from dbrx_train.data.chat import validate_messages
from dbrx_train.data.integrity import at_most_size, check_shard_files
from dbrx_train.data.prepare import expand_inputs, prepare_output_folder
from dbrx_train.data.text import (
    ModelSampleDataset,
    TextDatasetConfig,
    build_streaming_loader,
    check_local_streams,
)
from dbrx_train.data.token_mds import SHARD_HASHES, iter_samples, read_index
from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer
from dbrx_train.vocab import DBRX_VOCAB_SIZE, IGNORE_INDEX, PAD_TOKEN_ID

COLUMNS = {"input_ids": "ndarray:int32", "labels": "ndarray:int32"}
TRUNCATION_POLICIES = ("truncate", "skip", "error")
HOW_TO_MAKE_CHAT_DATA = (
    "Create it with `python data_prep/convert_finetuning_dataset.py --input FILE.jsonl --out DIR "
    "--max-seq-len N`, or run `make data` for the default chat set (data/default/chat)."
)


@dataclass
class FinetuningLoaderConfig:
    """``train_loader: {name: finetuning, dataset: {...}}``: the same dataset keys as `text`."""

    # Conversations (MDS `input_ids` + `labels`), padded to max_seq_len; loss on assistant turns only.
    name: Literal["finetuning"] = "finetuning"
    dataset: TextDatasetConfig = field(default_factory=TextDatasetConfig)
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


def iter_jsonl_conversations(paths: Iterable[Path]) -> Iterator[tuple[str, list[dict] | BadRow]]:
    """(where, conversation) per non-blank line, in file then line order; a bad line yields its
    BadRow instead of raising, so the caller decides between stopping and skipping."""
    for path in paths:
        if path.suffix != ".jsonl":
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

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_conversation(tokenizer: DbrxTokenizer, messages: list[dict], *, system_prompt: bool) -> Example:
    ids, trainable = tokenizer.encode_chat(messages, default_system_prompt=system_prompt)
    input_ids = np.array(ids, np.int32)
    labels = np.where(np.array(trainable, bool), input_ids, IGNORE_INDEX).astype(np.int32)
    return Example(input_ids, labels)


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


def pack_examples(examples: Iterable[Example], max_seq_len: int) -> Iterator[Example]:
    """Greedy, in order: append each example to the current row while it fits, else start a new one."""
    row: list[Example] = []
    length = 0
    for example in examples:
        if row and length + len(example.input_ids) > max_seq_len:
            yield _join(row)
            row, length = [], 0
        row.append(example)
        length += len(example.input_ids)
    if row:
        yield _join(row)


def _join(examples: list[Example]) -> Example:
    return Example(
        np.concatenate([e.input_ids for e in examples]), np.concatenate([e.labels for e in examples])
    )


def find_sample_problem(
    input_ids: np.ndarray, labels: np.ndarray, max_seq_len: int, vocab_size: int
) -> str | None:
    """Why this (input_ids, labels) pair cannot train a model with this max_seq_len and vocab."""
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

    def describe(self) -> str:
        text = (
            f"{self.rows:,} conversations -> {self.samples:,} samples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained); {self.truncated} truncated, {self.skipped_too_long} "
            f"skipped as too long, {self.skipped_bad} bad rows skipped, in {self.seconds:.1f} s"
        )
        return "\n".join([text, *(f"  skipped: {m}" for m in self.bad_examples)])


def convert_conversations(
    conversations: Iterable[tuple[str, list[dict] | BadRow]],
    out: str | Path,
    *,
    max_seq_len: int,
    truncation: str = "truncate",
    skip_bad: bool = False,
    pack: bool = False,
    system_prompt: bool = False,
    overwrite: bool = False,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
    vocab_size: int = DBRX_VOCAB_SIZE,
) -> ConvertSummary:
    """Tokenize (where, messages) pairs into a fine-tuning MDS dataset in `out`, then re-read it.
    `system_prompt`: insert DBRX's default system prompt where a conversation has none."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    out = Path(out)
    prepare_output_folder(out, overwrite)
    tokenizer = load_tokenizer()
    summary = ConvertSummary()
    start = time.perf_counter()

    def examples() -> Iterator[Example]:
        for where, messages in conversations:
            summary.rows += 1
            try:
                if isinstance(messages, BadRow):
                    raise messages
                example = tokenize_conversation(tokenizer, messages, system_prompt=system_prompt)
                fitted = fit_length(example, max_seq_len, truncation, where)
            except BadRow as error:
                if not skip_bad:
                    raise BadRow(f"{error} (pass --skip-bad to skip and count such rows)") from None
                summary.skipped_bad += 1
                if len(summary.bad_examples) < 5:
                    summary.bad_examples.append(str(error))
                continue
            if fitted is None:
                summary.skipped_too_long += 1
                continue
            summary.truncated += fitted is not example
            yield fitted

    rows = pack_examples(examples(), max_seq_len) if pack else examples()
    writer = MDSWriter(
        columns=COLUMNS, out=str(out), compression=compression, hashes=SHARD_HASHES, size_limit=size_limit
    )
    try:
        for example in tqdm(rows, desc="fine-tuning samples", unit=" samples", disable=None):
            writer.write({"input_ids": example.input_ids, "labels": example.labels})
            summary.samples += 1
            summary.tokens += len(example.input_ids)
            summary.trained_tokens += example.trained_tokens
    except BaseException:
        # Not `with MDSWriter(...)`: its __exit__ would write an index for a partial dataset.
        writer.cancel_future_jobs()
        shutil.rmtree(out, ignore_errors=True)
        raise
    writer.finish()
    summary.seconds = time.perf_counter() - start
    if summary.samples == 0:
        shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"no usable conversation among {summary.rows} rows; nothing was written to {out}")
    written = check_finetuning_mds(
        out, max_seq_len=max_seq_len, vocab_size=vocab_size, name="output", all_samples=True
    )
    if written.num_samples != summary.samples:
        raise RuntimeError(
            f"{out}: wrote {summary.samples} samples but its index lists {written.num_samples}"
        )
    return summary


def convert_finetuning_dataset(inputs: Sequence[str], out: str | Path, **options: Any) -> ConvertSummary:
    """.jsonl files/globs/folders of conversations -> one fine-tuning MDS dataset in `out`."""
    paths = [p for p in expand_inputs(inputs) if p.suffix == ".jsonl"]
    if not paths:
        raise FileNotFoundError(f"--input {list(inputs)} holds no .jsonl file")
    return convert_conversations(iter_jsonl_conversations(paths), out, **options)


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
        problem = find_sample_problem(input_ids, labels, max_seq_len, vocab_size)
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
    return check_local_streams(cfg, check_finetuning_mds, max_seq_len, vocab_size, config_key, verify_shards)


class FinetuningDataset(ModelSampleDataset):
    """Samples padded to max_seq_len: `input_ids` (pad id after the sample) and `labels` (-100 there)."""

    def get_item(self, idx: int, retry: int = 7) -> dict[str, torch.Tensor]:
        sample = super().get_item(idx, retry)
        if "input_ids" not in sample or "labels" not in sample:
            raise ValueError(
                f"{self.describe_sample(idx)} has columns {sorted(sample)}, but fine-tuning "
                f"data needs {list(COLUMNS)}. {HOW_TO_MAKE_CHAT_DATA}"
            )
        input_ids, labels = np.asarray(sample["input_ids"]), np.asarray(sample["labels"])
        problem = find_sample_problem(input_ids, labels, self.max_seq_len, self.vocab_size)
        if problem:
            raise ValueError(f"{self.describe_sample(idx)} {problem}.")
        padded_ids = np.full(self.max_seq_len, PAD_TOKEN_ID, np.int64)
        padded_labels = np.full(self.max_seq_len, IGNORE_INDEX, np.int64)
        padded_ids[: len(input_ids)] = input_ids
        padded_labels[: len(labels)] = labels
        return {
            "input_ids": torch.from_numpy(padded_ids),
            "labels": torch.from_numpy(padded_labels),
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
    """Batches of `input_ids`/`labels` (B, max_seq_len) int64 and `stream_id` (B,)."""
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
    )
