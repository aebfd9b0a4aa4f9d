"""Fine-tuning data on real conversations: ids and loss masks, truncation, bad rows, packing, the
padded loader and its early errors, the CLI and the default chat set."""

import json
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from dbrx_train.data.finetuning import (
    IGNORE_INDEX,
    PAD_TOKEN_ID,
    BadRow,
    FinetuningDatasetConfig,
    FinetuningLoaderConfig,
    build_finetuning_dataloader,
    check_finetuning_mds,
    convert_finetuning_dataset,
    find_sample_problem,
    validate_finetuning_dataset_config,
)
from dbrx_train.data.token_mds import iter_samples, read_index
from dbrx_train.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 100352
SEQ = 96


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def topic_rows() -> list[dict]:
    """Real conversations: both row formats, a system prompt, two assistant turns, one long answer."""
    names = sorted(topics)[:6]
    rows: list[dict] = [{"prompt": f"What is {name}?", "response": topics[name][:200]} for name in names[:3]]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "Answer from the Python docs."},
                {"role": "user", "content": f"Explain {names[3]}."},
                {"role": "assistant", "content": topics[names[3]][:150]},
                {"role": "user", "content": "And briefly?"},
                {"role": "assistant", "content": topics[names[3]][:40]},
            ]
        }
    )
    rows.append({"prompt": "Tell me everything about while.", "response": topics["while"]})  # too long
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_samples(folder: Path) -> list[dict]:
    index = read_index(folder, "t", columns=("input_ids", "labels"))
    return [sample for _, sample in iter_samples(folder, index["shards"], "t")]


def expected(tokenizer, row: dict) -> tuple[np.ndarray, np.ndarray]:
    messages = row.get("messages") or [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]
    ids, trainable = tokenizer.encode_chat(messages, default_system_prompt=False)
    return np.array(ids), np.where(trainable, ids, IGNORE_INDEX)


def test_samples_hold_chat_ids_and_train_only_assistant_turns(tmp_path, tokenizer):
    rows = topic_rows()
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = convert_finetuning_dataset([str(src)], tmp_path / "mds", max_seq_len=SEQ, size_limit=2048)
    samples = read_samples(tmp_path / "mds")
    assert (summary.rows, summary.samples, summary.truncated) == (5, 5, 1)
    for row, sample in zip(rows, samples, strict=True):
        ids, labels = expected(tokenizer, row)
        assert sample["input_ids"].dtype == np.int32 and sample["labels"].dtype == np.int32
        np.testing.assert_array_equal(sample["input_ids"], ids[:SEQ])
        np.testing.assert_array_equal(sample["labels"], labels[:SEQ])
    # What is trained decodes to exactly the assistant replies, each closed by <|im_end|>.
    multi = samples[3]
    trained = tokenizer.decode(multi["labels"][multi["labels"] != IGNORE_INDEX])
    turns = rows[3]["messages"]
    assert trained == f"{turns[2]['content']}<|im_end|>{turns[4]['content']}<|im_end|>"
    assert summary.trained_tokens == sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in samples)


def test_truncation_policies(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", topic_rows())
    skipped = convert_finetuning_dataset([str(src)], tmp_path / "skip", max_seq_len=SEQ, truncation="skip")
    assert (skipped.samples, skipped.skipped_too_long) == (4, 1)
    with pytest.raises(BadRow, match=rf"{src}:5: \d+ tokens, more than --max-seq-len {SEQ}"):
        convert_finetuning_dataset([str(src)], tmp_path / "err", max_seq_len=SEQ, truncation="error")
    assert not (tmp_path / "err").exists()
    # A prompt that alone fills max_seq_len leaves nothing to train: a bad row, never a silent sample.
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": topics["while"], "response": "ok"}])
    with pytest.raises(BadRow, match="leaves no assistant token to train on"):
        convert_finetuning_dataset([str(long_prompt)], tmp_path / "lp", max_seq_len=SEQ)


BAD_ROWS = [
    ('{"prompt": "unterminated', "not valid JSON"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ({"prompt": "only a prompt"}, "has 'prompt'/'response' but no 'response'"),
    ({"prompt": "x", "response": 7}, "'response' must be a string, got int"),
    ({"prompt": "  ", "response": "x"}, "'prompt' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "non-empty"),
    ({"text": "pretraining row"}, "expected 'messages' or 'prompt' and 'response'"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_row_names_file_and_line(tmp_path, bad, reason):
    good = topic_rows()[:2]
    src = write_jsonl(tmp_path / "chat.jsonl", [good[0], bad, good[1]])
    with pytest.raises(BadRow, match=rf"{src}:2: .*{reason}.*--skip-bad") as info:
        convert_finetuning_dataset([str(src)], tmp_path / "out", max_seq_len=SEQ)
    assert "--skip-bad" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_skip_bad_counts_and_keeps_the_good_rows(tmp_path):
    good = topic_rows()[:3]
    rows = [good[0], *(bad for bad, _ in BAD_ROWS), good[1], "", good[2]]  # "" = blank line, not a row
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = convert_finetuning_dataset([str(src)], tmp_path / "out", max_seq_len=SEQ, skip_bad=True)
    assert (summary.samples, summary.skipped_bad, summary.rows) == (3, len(BAD_ROWS), 3 + len(BAD_ROWS))
    assert summary.bad_examples[0].startswith(f"{src}:2: not valid JSON")
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [bad for bad, _ in BAD_ROWS])
    with pytest.raises(ValueError, match="no usable conversation"):
        convert_finetuning_dataset([str(all_bad)], tmp_path / "none", max_seq_len=SEQ, skip_bad=True)


def test_packing_joins_whole_conversations_in_order(tmp_path, tokenizer):
    rows = topic_rows()[:4]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = convert_finetuning_dataset([str(src)], tmp_path / "packed", max_seq_len=256, pack=True)
    samples = read_samples(tmp_path / "packed")
    assert summary.samples == len(samples) < len(rows)
    parts = [expected(tokenizer, row) for row in rows]
    np.testing.assert_array_equal(
        np.concatenate([s["input_ids"] for s in samples]), np.concatenate([p[0] for p in parts])
    )
    np.testing.assert_array_equal(
        np.concatenate([s["labels"] for s in samples]), np.concatenate([p[1] for p in parts])
    )
    assert all(len(s["input_ids"]) <= 256 for s in samples)
    # each token carries its conversation's number within the row, which the loader pads with -1
    lengths = [len(p[0]) for p in parts]
    ids_per_row = [np.unique(s["sequence_id"]).tolist() for s in samples]
    assert all(ids == list(range(len(ids))) for ids in ids_per_row)
    np.testing.assert_array_equal(np.concatenate([np.bincount(s["sequence_id"]) for s in samples]), lengths)
    (batch,) = build_finetuning_dataloader(
        loader_cfg(tmp_path / "packed", shuffle=False),
        device_batch_size=len(samples),
        max_seq_len=256,
        vocab_size=VOCAB,
        seed=0,
    )
    for row, sample in zip(batch["sequence_id"], samples, strict=True):
        n = len(sample["input_ids"])
        assert row[:n].tolist() == sample["sequence_id"].tolist() and set(row[n:].tolist()) <= {-1}


def test_refuses_to_overwrite_unless_asked(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", topic_rows()[:2])
    convert_finetuning_dataset([str(src)], tmp_path / "out", max_seq_len=SEQ)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_finetuning_dataset([str(src)], tmp_path / "out", max_seq_len=SEQ)
    convert_finetuning_dataset([str(src)], tmp_path / "out", max_seq_len=SEQ, overwrite=True)


def loader_cfg(folder: Path, **kwargs) -> FinetuningLoaderConfig:
    return FinetuningLoaderConfig(dataset=FinetuningDatasetConfig(local=str(folder), **kwargs))


def test_loader_pads_each_sample_and_masks_the_padding(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", topic_rows())
    convert_finetuning_dataset([str(src)], tmp_path / "mds", max_seq_len=SEQ)
    stored = read_samples(tmp_path / "mds")
    loader = build_finetuning_dataloader(
        loader_cfg(tmp_path / "mds", shuffle=False),
        device_batch_size=5,
        max_seq_len=128,
        vocab_size=VOCAB,
        seed=0,
    )
    (batch,) = list(loader)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, 128)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["stream_id"].tolist() == [0] * 5
    for row_ids, row_labels, sample in zip(batch["input_ids"], batch["labels"], stored, strict=True):
        n = len(sample["input_ids"])
        assert row_ids[:n].tolist() == sample["input_ids"].tolist()
        assert row_labels[:n].tolist() == sample["labels"].tolist()
        assert set(row_ids[n:].tolist()) <= {PAD_TOKEN_ID} and set(row_labels[n:].tolist()) <= {IGNORE_INDEX}
    # unpacked: one conversation per row, padding marked -1 (it never counts in router statistics)
    assert (batch["sequence_id"] == torch.where(batch["input_ids"] == PAD_TOKEN_ID, -1, 0)).all()


def test_data_errors_name_the_stream_and_say_how_to_make_data(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", topic_rows())
    convert_finetuning_dataset([str(src)], tmp_path / "mds", max_seq_len=SEQ)
    with pytest.raises(
        ValueError, match=r"train_loader.dataset: sample 0 .* more than max_seq_len=32.*--max-seq-len 32"
    ):
        validate_finetuning_dataset_config(loader_cfg(tmp_path / "mds"), 32, VOCAB)
    with pytest.raises(ValueError, match=r"token id \d+, outside \[0, vocab_size=1000\)"):
        validate_finetuning_dataset_config(loader_cfg(tmp_path / "mds"), SEQ, 1000)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*convert_finetuning_dataset.py.*make data"):
        validate_finetuning_dataset_config(loader_cfg(tmp_path / "nothing"), SEQ, VOCAB)
    # pretraining data given to the finetuning loader
    with MDSWriter(columns={"tokens": "ndarray:int32"}, out=str(tmp_path / "pretrain")) as writer:
        writer.write({"tokens": np.arange(SEQ, dtype=np.int32)})
    with pytest.raises(ValueError, match=r"columns \['tokens'\].*needs \['input_ids', 'labels'\]"):
        validate_finetuning_dataset_config(loader_cfg(tmp_path / "pretrain"), SEQ, VOCAB)
    # a sample with nothing to train, found as it is read
    with MDSWriter(
        columns={"input_ids": "ndarray:int32", "labels": "ndarray:int32"}, out=str(tmp_path / "x")
    ) as w:
        for i in range(4):
            ids = np.arange(10, dtype=np.int32)
            w.write({"input_ids": ids, "labels": ids if i != 2 else np.full(10, -100, np.int32)})
    loader = build_finetuning_dataloader(
        loader_cfg(tmp_path / "x", shuffle=False),
        device_batch_size=4,
        max_seq_len=SEQ,
        vocab_size=VOCAB,
        seed=0,
    )
    with pytest.raises(
        ValueError, match=r"train_loader.dataset: sample 2 \(shard shard.00000.mds\).*no trained"
    ):
        list(loader)


def test_cli_converts_and_reports(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [*topic_rows(), {"prompt": ""}])
    out = tmp_path / "cli"
    cmd = [sys.executable, "data_prep/convert_finetuning_dataset.py", "--input", str(src), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--max-seq-len", str(SEQ)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {src}:6:"), proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [*cmd, "--max-seq-len", str(SEQ), "--skip-bad", "--pack"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 bad rows skipped" in proc.stdout and f"skipped: {src}:6:" in proc.stdout
    assert check_finetuning_mds(out, max_seq_len=SEQ, vocab_size=VOCAB, all_samples=True).num_samples >= 1


def test_default_chat_set(real_vocab_corpus, tokenizer):
    manifest = json.loads((real_vocab_corpus / "manifest.json").read_text())
    questions = {}
    for split in ("train", "val"):
        entry = manifest["finetuning"]["chat"][split]
        info = check_finetuning_mds(
            real_vocab_corpus / entry["folder"], max_seq_len=64, vocab_size=VOCAB, all_samples=True
        )
        rows = [json.loads(line) for line in (real_vocab_corpus / entry["jsonl"]).read_text().splitlines()]
        assert info.num_samples == entry["samples"] == len(rows) >= 20
        for row in rows[:5]:
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"]
        questions[split] = {row["messages"][0]["content"] for row in rows}
        # every conversation fits whole: its answer ends in <|im_end|>
        for sample in read_samples(real_vocab_corpus / entry["folder"]):
            assert sample["input_ids"][-1] == tokenizer.im_end_id
    assert not questions["train"] & questions["val"]


def test_cli_takes_foundrys_flags(tmp_path, tokenizer, capsys):
    """LLM Foundry's convert_finetuning_dataset.py way: --dataset (a local folder laid out as the
    Hub's, one file per split) with --splits and --out_root writes OUT_ROOT/<split>; --target_responses
    last trains only the last answer; a flag with no equivalent is refused naming what to use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli", REPO / "data_prep/convert_finetuning_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = topic_rows()[:4]
    (tmp_path / "dolly" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "dolly/data/train-00000-of-00001.jsonl", rows)
    write_jsonl(tmp_path / "dolly/data/validation-00000-of-00001.jsonl", rows[:1])
    out = tmp_path / "out"
    flags = ["--dataset", str(tmp_path / "dolly"), "--out_root", str(out), "--max_seq_len", "256"]
    script.main(
        [
            *flags,
            "--tokenizer",
            "databricks/dbrx-instruct",
            "--target_responses",
            "last",
            "--num_workers",
            "8",
        ]
    )
    train, validation = read_samples(out / "train"), read_samples(out / "validation")
    assert len(train) == 4 and len(validation) == 1
    ids, labels = expected(tokenizer, rows[3])  # two assistant turns: only the second is trained
    np.testing.assert_array_equal(train[3]["input_ids"], ids)
    trained = train[3]["labels"] != IGNORE_INDEX
    assert (
        0 < trained.sum() < (labels != IGNORE_INDEX).sum()
        and (train[3]["labels"][trained] == ids[trained]).all()
    )
    with pytest.raises(SystemExit) as refused:
        script.main([*flags, "--preprocessor", "my.module:fn"])
    assert refused.value.code == 2
    assert (
        "--preprocessor (LLM Foundry) has no equivalent here: rows must hold prompt/response"
        in capsys.readouterr().err
    )


def test_special_token_strings_in_content_are_counted_and_encoded_as_text(tmp_path):
    forged = {
        "prompt": "Print <|im_end|> and <|endoftext|>",
        "response": "They are <|im_end|> and <|endoftext|>.",
    }
    src = write_jsonl(tmp_path / "chat.jsonl", [forged, *topic_rows()[:2]])
    summary = convert_finetuning_dataset([str(src)], tmp_path / "text", max_seq_len=SEQ)
    assert summary.special_strings == 4 and "4 special-token strings" in summary.describe()
    [sample, *_] = read_samples(tmp_path / "text")
    im_end, eos = 100279, 100257
    # Only the template's two <|im_end|> (one per turn); the content's strings are plain text.
    assert list(sample["input_ids"]).count(im_end) == 2 and eos not in sample["input_ids"]
    summary = convert_finetuning_dataset(
        [str(src)], tmp_path / "allowed", max_seq_len=SEQ, allow_special_tokens=True
    )
    assert "encoded as control tokens" in summary.describe()
    [sample, *_] = read_samples(tmp_path / "allowed")
    assert list(sample["input_ids"]).count(im_end) == 4 and list(sample["input_ids"]).count(eos) == 2


def test_a_sequence_id_column_that_does_not_number_conversations_in_order_is_refused():
    ids = np.arange(6, dtype=np.int32)
    labels = ids.copy()
    assert find_sample_problem(ids, labels, 8, VOCAB, np.array([0, 0, 1, 1, 2, 2])) is None
    for bad in ([0, 0, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1], [0, 0, 1]):
        assert "sequence_id" in find_sample_problem(ids, labels, 8, VOCAB, np.array(bad))
