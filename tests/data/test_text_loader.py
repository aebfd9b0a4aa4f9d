"""The pretraining loader over real MDS folders: batches, order, mixtures and early errors."""

import inspect
import json
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from dbrx_train.data.prepare import pack_to_mds, tokenize_documents
from dbrx_train.data.text import (
    StreamConfig,
    TextDatasetConfig,
    TextLoaderConfig,
    build_text_dataloader,
    documents_after,
    validate_text_dataset_config,
)
from dbrx_train.data.token_mds import iter_token_samples, read_index, write_token_mds

SEQ = 32
VOCAB = 100352


def write_real_text(out: Path, texts: list[str]) -> list[tuple[int, ...]]:
    pack_to_mds(tokenize_documents(texts), out, max_seq_len=SEQ, size_limit=16_384, progress=False)
    return [tuple(ids) for _, ids in iter_token_samples(out, read_index(out, "test")["shards"], "test")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple[Path, list[tuple[int, ...]]]]:
    """Two real datasets (help topics, stdlib source): ~280 and ~190 samples of 32 tokens."""
    root = tmp_path_factory.mktemp("mds")
    prose = [topics[name] for name in sorted(topics)[:12]]
    code = [inspect.getsource(json), inspect.getsource(inspect.getmodule(Counter))[:12000]]
    return {
        "prose": (root / "prose", write_real_text(root / "prose", prose)),
        "code": (root / "code", write_real_text(root / "code", code)),
    }


def loader_cfg(local: Path | None = None, **dataset_kwargs) -> TextLoaderConfig:
    return TextLoaderConfig(dataset=TextDatasetConfig(local=str(local) if local else None, **dataset_kwargs))


def epoch(
    cfg: TextLoaderConfig, *, batch_size: int = 4, seed: int = 17, max_seq_len: int = SEQ
) -> list[tuple]:
    loader = build_text_dataloader(
        cfg, device_batch_size=batch_size, max_seq_len=max_seq_len, vocab_size=VOCAB, seed=seed
    )
    rows = []
    for batch in loader:
        ids = batch["input_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (batch_size, max_seq_len)
        rows += [tuple(row.tolist()) for row in ids]
    return rows


def test_one_epoch_yields_every_sample_once_in_b_t_int64_batches(data):
    folder, samples = data["prose"]
    assert len(samples) > 100
    rows = epoch(
        TextLoaderConfig(dataset=TextDatasetConfig(local=str(folder)), drop_last=False), batch_size=1
    )
    assert Counter(rows) == Counter(samples)
    assert rows != samples  # shuffled


def test_same_seed_same_order_other_seed_other_order(data):
    folder, samples = data["prose"]
    first, again, other = (epoch(loader_cfg(folder), seed=seed) for seed in (3, 3, 4))
    assert first == again
    assert first != other
    assert len(first) == len(samples) // 4 * 4  # drop_last: whole batches only


def test_resuming_from_state_dict_continues_the_epoch(data):
    folder, _ = data["prose"]

    def loader():
        return build_text_dataloader(
            loader_cfg(folder), device_batch_size=4, max_seq_len=SEQ, vocab_size=VOCAB, seed=5
        )

    full = [batch["input_ids"] for batch in loader()]
    first = loader()
    head = [batch["input_ids"] for _, batch in zip(range(3), first, strict=False)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = [batch["input_ids"] for batch in resumed]
    assert torch.equal(torch.cat(head + tail), torch.cat(full))


def test_worker_processes_deliver_the_same_samples(data):
    folder, samples = data["code"]
    cfg = TextLoaderConfig(dataset=TextDatasetConfig(local=str(folder)), num_workers=2, drop_last=False)
    assert Counter(epoch(cfg, batch_size=2)) == Counter(samples)


def test_two_stream_mixture_follows_proportions(data):
    (prose, prose_samples), (code, code_samples) = data["prose"], data["code"]
    streams = {
        "prose": StreamConfig(local=str(prose.parent), split=prose.name, proportion=0.25),
        "code": StreamConfig(local=str(code), proportion=0.75),
    }
    rows = epoch(TextLoaderConfig(dataset=TextDatasetConfig(streams=streams), drop_last=False), batch_size=1)
    total = len(prose_samples) + len(code_samples)
    assert len(rows) == total  # epoch size stays the data size; proportions reweight it
    from_prose = sum(row in set(prose_samples) for row in rows)
    assert abs(from_prose - 0.25 * total) <= 1
    assert set(rows) <= set(prose_samples) | set(code_samples)


def test_legacy_bytes_column_is_read(tmp_path):
    ids = np.arange(100, 100 + 5 * SEQ, dtype=np.int64).reshape(5, SEQ)
    with MDSWriter(columns={"bytes": "bytes"}, out=str(tmp_path / "legacy")) as writer:
        for row in ids:
            writer.write({"bytes": row.tobytes()})
    found = validate_text_dataset_config(loader_cfg(tmp_path / "legacy"), SEQ, VOCAB)
    assert found["train_loader.dataset"].column == "bytes"
    rows = epoch(
        TextLoaderConfig(dataset=TextDatasetConfig(local=str(tmp_path / "legacy"), shuffle=False)),
        batch_size=5,
    )
    assert rows == [tuple(row) for row in ids.tolist()]


def test_missing_folder_and_index_say_how_to_make_data(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=r"train_loader.dataset: .*does not exist.*convert_text_to_mds.py.*make data"
    ):
        validate_text_dataset_config(loader_cfg(missing), SEQ, VOCAB)
    missing.mkdir()
    (missing / "shard.00000.mds").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no index.json.*convert_text_to_mds.py.*make data"):
        build_text_dataloader(
            loader_cfg(missing), device_batch_size=2, max_seq_len=SEQ, vocab_size=VOCAB, seed=0
        )


def test_stream_errors_name_the_stream(data, tmp_path):
    prose, _ = data["prose"]
    streams = {
        "prose": StreamConfig(local=str(prose)),
        "web": StreamConfig(local=str(tmp_path), split="train"),
    }
    with pytest.raises(FileNotFoundError, match=rf"train_loader.dataset.streams.web: .*{tmp_path / 'train'}"):
        validate_text_dataset_config(TextLoaderConfig(dataset=TextDatasetConfig(streams=streams)), SEQ, VOCAB)


def test_wrong_sequence_length_says_both_lengths_and_the_fix(data):
    folder, _ = data["prose"]
    with pytest.raises(ValueError, match=r"has 32 tokens, but max_seq_len is 64.*\(32\).*--max-seq-len 64"):
        validate_text_dataset_config(loader_cfg(folder), 64, VOCAB)


def write_ids(out: Path, rows: np.ndarray) -> Path:
    write_token_mds(list(rows.astype(np.int32)), out)
    return out


@pytest.mark.parametrize("bad_id", [VOCAB, -5])
def test_out_of_vocabulary_first_sample_fails_up_front(tmp_path, bad_id):
    rows = np.full((6, SEQ), 7)
    rows[0, 3] = bad_id
    folder = write_ids(tmp_path / "bad", rows)
    with pytest.raises(
        ValueError,
        match=rf"sample 0 \(shard shard.00000.mds\) .* token id {bad_id}, outside \[0, vocab_size=100352\)",
    ):
        validate_text_dataset_config(loader_cfg(folder), SEQ, VOCAB)


def test_out_of_vocabulary_later_sample_fails_when_read(tmp_path):
    rows = np.full((8, SEQ), 7)
    rows[5, -1] = VOCAB + 10
    folder = write_ids(tmp_path / "bad_later", rows)
    validate_text_dataset_config(loader_cfg(folder), SEQ, VOCAB)  # only the first sample is checked up front
    with pytest.raises(
        ValueError, match=r"train_loader.dataset: sample 5 \(shard shard.00000.mds\).* token id 100362"
    ):
        epoch(loader_cfg(folder, shuffle=False), batch_size=2)


def test_wrong_column_and_empty_dataset(tmp_path):
    with MDSWriter(columns={"text": "str"}, out=str(tmp_path / "raw_text")) as writer:
        writer.write({"text": "not tokenized"})
    with pytest.raises(ValueError, match=r"columns \['text'\].*needs `tokens`.*legacy `bytes`"):
        validate_text_dataset_config(loader_cfg(tmp_path / "raw_text"), SEQ, VOCAB)
    with MDSWriter(columns={"tokens": "ndarray:int32"}, out=str(tmp_path / "empty")):
        pass
    with pytest.raises(ValueError, match="holds no samples"):
        validate_text_dataset_config(loader_cfg(tmp_path / "empty"), SEQ, VOCAB)


def test_config_errors_name_the_key(data):
    folder, _ = data["prose"]
    both = TextDatasetConfig(local=str(folder), streams={"a": StreamConfig(local=str(folder))})
    with pytest.raises(ValueError, match="eval_loader.dataset: set either `streams` or `local`"):
        validate_text_dataset_config(TextLoaderConfig(dataset=both), SEQ, VOCAB, config_key="eval_loader")
    with pytest.raises(ValueError, match="set `local`"):
        validate_text_dataset_config(TextLoaderConfig(), SEQ, VOCAB)
    partial = {
        "a": StreamConfig(local=str(folder), proportion=1.0),
        "b": StreamConfig(local=str(folder) + "x"),
    }
    with pytest.raises(ValueError, match=r"proportion.*missing in \['train_loader.dataset.streams.b'\]"):
        validate_text_dataset_config(TextLoaderConfig(dataset=TextDatasetConfig(streams=partial)), SEQ, VOCAB)
    with pytest.raises(ValueError, match="train_loader.prefetch_factor"):
        validate_text_dataset_config(
            TextLoaderConfig(dataset=loader_cfg(folder).dataset, prefetch_factor=2), SEQ, VOCAB
        )
    with pytest.raises(ValueError, match="shuffle_algo 'py9'"):
        validate_text_dataset_config(loader_cfg(folder, shuffle_algo="py9"), SEQ, VOCAB)


def test_too_few_samples_for_one_batch(tmp_path):
    folder = write_ids(tmp_path / "small", np.full((3, SEQ), 7))
    with pytest.raises(ValueError, match="3 samples per epoch, fewer than device_batch_size=4"):
        build_text_dataloader(
            loader_cfg(folder), device_batch_size=4, max_seq_len=SEQ, vocab_size=VOCAB, seed=0
        )


def test_eos_token_id_gives_each_token_its_document(data):
    assert documents_after(torch.tensor([5, 9, 100257, 7, 100257, 100257, 3]), 100257).tolist() == [
        0,
        0,
        0,
        1,
        1,
        2,
        3,
    ]
    loader = build_text_dataloader(
        loader_cfg(data["prose"][0], shuffle=False, eos_token_id=100257),
        device_batch_size=4,
        max_seq_len=SEQ,
        vocab_size=VOCAB,
        seed=0,
    )
    batches = list(loader)
    ends = 0
    for batch in batches:
        ids, seq = batch["input_ids"], batch["sequence_id"]
        assert seq.shape == ids.shape and (seq[:, 0] == 0).all()
        # the id steps up right after each EOS, and only there
        assert torch.equal(seq.diff(dim=1), (ids[:, :-1] == 100257).long())
        ends += int((ids == 100257).sum())
    assert ends >= 11  # the 12 help topics' EOS tokens (minus the dropped tail)
    with pytest.raises(ValueError, match="eos_token_id"):
        validate_text_dataset_config(loader_cfg(data["prose"][0], eos_token_id=-1), SEQ, VOCAB)
