"""Fine-tuning straight from .jsonl/.parquet files (LLM Foundry's `dataset.hf_name`): the files found
as `datasets.load_dataset` would find them, tokenized once into a cache equal to what the prep
script writes, Foundry's options, bad rows, and local rank 0 tokenizing while the others wait."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbrx_train.config.schema import ConfigError, build
from dbrx_train.data.finetuning import IGNORE_INDEX, FinetuningLoaderConfig, convert_finetuning_dataset
from dbrx_train.data.finetuning_files import FileDataError, find_files, tokenize_once
from dbrx_train.data.loaders import build_dataloader
from dbrx_train.data.tokenizer import load_tokenizer
from tests.data.test_finetuning import SEQ, expected, read_samples, topic_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VOCAB = 100352


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def loader(tmp_path: Path, **dataset) -> FinetuningLoaderConfig:
    return build(
        FinetuningLoaderConfig, {"dataset": {"cache_dir": str(tmp_path / "cache"), **dataset}}, "train_loader"
    )


@pytest.fixture
def dolly(tmp_path) -> Path:
    """A local copy laid out as the Hub's dolly_hhrlhf: data/{train,test}-00000-of-00001.parquet."""
    rows = [r for r in topic_rows() if "prompt" in r][:3]
    (tmp_path / "dolly" / "data").mkdir(parents=True)
    for split, part in (("train", rows), ("test", rows[:1])):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"dolly/data/{split}-00000-of-00001.parquet")
    return tmp_path / "dolly"


def test_files_are_found_as_load_dataset_finds_them(tmp_path, dolly):
    def files(**dataset):
        return [
            p.relative_to(tmp_path) for p in find_files(loader(tmp_path, **dataset).dataset, "train_loader")
        ]

    assert files(hf_name=str(dolly), split="train") == [Path("dolly/data/train-00000-of-00001.parquet")]
    assert files(hf_name=str(dolly), split="test") == [Path("dolly/data/test-00000-of-00001.parquet")]
    with pytest.raises(
        FileDataError, match=r"no file under .* holds split 'validation'; found splits \['test', 'train'\]"
    ):
        files(hf_name=str(dolly), split="validation")
    (tmp_path / "chats").mkdir()
    plain = write_jsonl(tmp_path / "chats" / "all.jsonl", topic_rows())
    assert files(hf_name=str(plain.parent), split="train") == [
        Path("chats/all.jsonl")
    ]  # no split names: train
    assert files(hf_name=str(plain)) == [Path("chats/all.jsonl")]
    assert files(hf_name="json", hf_kwargs={"data_dir": str(plain.parent)}, split="train") == [
        Path("chats/all.jsonl")
    ]
    by_split = {"data_files": {"train": "data/train-*.parquet", "test": "data/test-*"}}
    assert files(hf_name=str(dolly), hf_kwargs=by_split, split="test") == [
        Path("dolly/data/test-00000-of-00001.parquet")
    ]
    with pytest.raises(FileDataError) as hub:
        files(hf_name="mosaicml/dolly_hhrlhf", split="train")
    assert str(hub.value) == (
        "train_loader.hf_name 'mosaicml/dolly_hhrlhf' is not a local file or folder; it looks like a Hugging Face "
        "Hub dataset id, and nothing is downloaded here. Download its files where the hub is reachable and point "
        "hf_name at the folder, or prepare MDS once: `python data_prep/convert_finetuning_dataset.py --input "
        "FILES.jsonl --out data/chat/train --max-seq-len N` and set train_loader.dataset.local"
    )


def test_tokenized_once_into_what_the_prep_script_writes(tmp_path, dolly, tokenizer):
    """The cache holds the samples convert_finetuning_dataset.py writes from the same rows (jsonl and
    parquet alike), each as the chat ids computed here; an unchanged file reuses it, a changed one not."""
    rows = [r for r in topic_rows() if "prompt" in r][:3]
    cfg = loader(tmp_path, hf_name=str(dolly), split="train")
    folder = tokenize_once(cfg, SEQ, "train_loader", local_rank=0)
    samples = read_samples(folder)
    for sample, row in zip(samples, rows, strict=True):
        ids, labels = expected(tokenizer, row)
        np.testing.assert_array_equal(sample["input_ids"], ids[:SEQ])
        np.testing.assert_array_equal(sample["labels"], labels[:SEQ])
    script = convert_finetuning_dataset(
        [str(write_jsonl(tmp_path / "rows.jsonl", rows))], tmp_path / "prep", max_seq_len=SEQ
    )
    assert script.samples == len(samples)
    for ours, theirs in zip(samples, read_samples(tmp_path / "prep"), strict=True):
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    written = (folder / "index.json").stat().st_mtime_ns
    assert tokenize_once(cfg, SEQ, "train_loader", local_rank=0) == folder
    assert (folder / "index.json").stat().st_mtime_ns == written  # reused, not rewritten
    parquet = dolly / "data/train-00000-of-00001.parquet"
    os.utime(parquet, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert tokenize_once(cfg, SEQ, "train_loader", local_rank=0) != folder  # the file changed: a new key
    assert (
        tokenize_once(
            loader(tmp_path, hf_name=str(dolly), split="train", packing_ratio="auto"), SEQ, "train_loader", 0
        )
        != folder
    )


def test_foundry_options_pack_target_the_last_answer_and_trim_padding(tmp_path, tokenizer):
    rows = topic_rows()[:4]  # the 4th has two assistant turns
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    # packing_ratio auto: whole conversations share samples in order, none dropped
    packed = read_samples(
        tokenize_once(loader(tmp_path, hf_name=str(src), packing_ratio="auto"), 256, "k", 0)
    )
    parts = [expected(tokenizer, row) for row in rows]
    assert len(packed) < len(rows)
    np.testing.assert_array_equal(
        np.concatenate([s["input_ids"] for s in packed]), np.concatenate([p[0] for p in parts])
    )
    capped = read_samples(tokenize_once(loader(tmp_path, hf_name=str(src), packing_ratio=1.5), 256, "k", 0))
    assert len(capped) == 2  # at most ceil(1.5) = 2 conversations per sample
    # target_responses: last (LLM Foundry's default) trains only the final answer of the multi-turn row
    last = read_samples(
        tokenize_once(loader(tmp_path, hf_name=str(src), target_responses="last"), 256, "k", 0)
    )
    ids, all_labels = parts[3]
    final = rows[3]["messages"][-1]["content"]
    trained = last[3]["labels"] != IGNORE_INDEX
    assert trained.sum() == len(tokenizer.encode(final)) + 1  # the answer and its <|im_end|>
    np.testing.assert_array_equal(last[3]["labels"][trained], all_labels[trained])
    assert (all_labels != IGNORE_INDEX).sum() > trained.sum()  # `all` also trains the first answer
    # allow_pad_trimming: batches as wide as their longest sample, not max_seq_len
    cfg = loader(tmp_path, hf_name=str(src), allow_pad_trimming=True, shuffle=False)
    tokenize_once(cfg, 256, "train_loader", 0)
    batch = next(iter(build_dataloader(cfg, device_batch_size=4, max_seq_len=256, vocab_size=VOCAB, seed=0)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(len(p[0]) for p in parts))


def test_bad_rows_stop_with_file_and_line_or_are_skipped(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [*topic_rows()[:2], {"prompt": "no answer"}])
    with pytest.raises(FileDataError) as bad:
        tokenize_once(loader(tmp_path, hf_name=str(src)), SEQ, "train_loader", 0)
    assert str(bad.value).startswith(
        f"train_loader.dataset.hf_name: {src}:3: has 'prompt'/'response' but no 'response'"
    )
    assert "(set dataset.skip_bad_rows: true to skip and count such rows)" in str(bad.value)
    folder = tokenize_once(loader(tmp_path, hf_name=str(src), skip_bad_rows=True), SEQ, "train_loader", 0)
    assert len(read_samples(folder)) == 2
    with pytest.raises(ConfigError, match=r"'train_loader.dataset.packing_ratio' applies to hf_name files"):
        loader(tmp_path, local=str(folder), packing_ratio="auto")
    with pytest.raises(ConfigError, match=r"'train_loader.dataset.decoder_only_format' must be true"):
        loader(tmp_path, hf_name=str(src), decoder_only_format=False)


WORKER = """
import sys
from dbrx_train.config.schema import build
from dbrx_train.data.finetuning import FinetuningLoaderConfig
from dbrx_train.data.finetuning_files import FileDataError, tokenize_once
cfg = build(FinetuningLoaderConfig, {"dataset": {"hf_name": sys.argv[1], "cache_dir": sys.argv[2]}})
try:
    print("folder", tokenize_once(cfg, 96, "train_loader", int(sys.argv[3])))
except FileDataError as e:
    print("error", e)
"""


def test_local_rank_0_tokenizes_while_the_others_wait_for_its_result(tmp_path):
    """Two processes of one launcher (same parent): rank 1 starts first and waits for rank 0, and a
    bad row reaches it as rank 0's own file:line error (the launch test covers the good case)."""
    src = write_jsonl(tmp_path / "chat.jsonl", [*topic_rows()[:2], {"prompt": "x"}])
    cmd = [sys.executable, "-c", WORKER, str(src), str(tmp_path / "cache")]
    waiter = subprocess.Popen([*cmd, "1"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    builder = subprocess.run([*cmd, "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    waited = waiter.communicate(timeout=300)[0].strip()
    assert waited.startswith(f"error train_loader.dataset.hf_name: {src}:3:"), waited
    tokenizing, error = builder.stdout.splitlines()
    assert tokenizing.startswith(f"dbrx-train: train_loader: tokenizing 1 file(s) of {src} into ")
    assert error == waited  # the waiting rank reports rank 0's error, and tokenized nothing itself
    assert not list((tmp_path / "cache" / "finetuning").glob("*.tmp-*"))  # no half-written folder left
