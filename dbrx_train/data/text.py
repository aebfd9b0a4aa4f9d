"""Pretraining data: fixed-length token sequences streamed from MDS folders by MosaicML Streaming.

YAML (keys follow LLM Foundry's `train_loader`):

    train_loader:
      name: text
      dataset:
        local: data/default/code      # one stream ...
        split: train
        # ... or a mixture of named streams (exclusive with local/remote):
        # streams:
        #   prose: {local: data/default/prose, proportion: 0.3}
        #   code:  {local: data/default/code, proportion: 0.7}
        shuffle: true
      drop_last: true
      num_workers: 2

Each sample is `{"input_ids": LongTensor (max_seq_len,), "stream_id": LongTensor (), "sample_idx":
LongTensor ()}` (the index of its stream in `streams`, for per-stream counts; its global index in
the dataset, for provenance); the default collate makes `(B, T)`, `(B,)` and `(B,)`. With
`dataset.eos_token_id` (LLM Foundry's key) it also has `sequence_id` (max_seq_len,): a new document
after each such token, so the model can keep the documents of a row apart (DBRX's own pretraining
convention is plain concatenation, the default).
Problems with the data (missing folder, missing or damaged shard files, wrong sequence length, ids
outside the vocabulary) are reported before training starts by `validate_text_dataset_config`,
and again per shard and sample as they are read (data/integrity.py), naming the stream, shard and
sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.shuffle import algos as shuffle_algos

from dbrx_train.data.integrity import (
    CheckedStream,
    GuardedStreamingDataset,
    ShardReadError,
    VerifyShards,
    at_most_size,
)
from dbrx_train.data.token_mds import (
    LEGACY_BYTES_COLUMN,
    TOKENS_COLUMN,
    TokenMDSInfo,
    check_token_mds,
    find_token_problem,
    sample_token_ids,
)


@dataclass
class StreamConfig:
    """One named stream of a mixture: the MDS folder is `local/split` (or `local`)."""

    local: str  # the MDS folder (with `split`: its parent); where `remote`'s shards are downloaded to
    remote: str | None = None  # if set, shards are downloaded from here into `local`
    split: str | None = None  # subfolder of `local` to read; null: the dataset's `split`
    proportion: float | None = None  # relative weight; give it to all streams or none


@dataclass
class TextDatasetConfig:
    local: str | None = None  # single-stream shorthand: the MDS folder is `local/split`
    remote: str | None = None  # if set (e.g. s3://bucket/dir), shards are downloaded from here into `local`
    split: str | None = None  # subfolder of local (and remote) to read, e.g. train or val; null: none
    streams: dict[str, StreamConfig] | None = None  # named streams (mixtures); exclusive with local/remote
    shuffle: bool = True  # shuffle the sample order (seeded by shuffle_seed); false: stored order
    shuffle_seed: int | None = None  # seeds the sample order; null: the run's seed
    shuffle_algo: str = "py1e"  # Streaming's shuffle algorithm: py1e, py1br, py1s, py2s or naive
    # Samples per shuffle block; null: Streaming's default, max(4M / num_canonical_nodes, 2**18).
    shuffle_block_size: int | None = None
    # The sample order is a function of (seed, num_canonical_nodes), not of the world size.
    # Streaming saves the value in checkpoints, so a resumed run keeps its order; pin it
    # (e.g. to the node count of the first run) to get identical order across runs that use
    # different numbers of nodes. null: Streaming's default (the number of nodes of this run,
    # times 64 for py1s/py2s).
    num_canonical_nodes: int | None = None
    predownload: int | None = None  # samples to download ahead per worker; null: 8 * device_batch_size
    download_timeout: float = 60.0  # seconds to wait for one shard to download before failing
    # Hash to check each shard against its index, e.g. "sha1" (written by data_prep/convert_text_to_mds.py);
    # null: no check.
    validate_hash: str | None = None
    keep_zip: bool = False  # keep compressed shards after decompressing them (Streaming's keep_zip)
    # Checks of each local (or local `remote`) folder's shard files before training, on every rank:
    # size: each file index.json lists is there with its recorded size (stat only). hash: also each
    # file's hash in index.json (reads every byte). full: also every sample decompressed, decoded and
    # checked (reads and decodes everything). All but none also check each shard file against its
    # hash in index.json when a process first reads from it (no sample of a corrupt shard is trained
    # on). none: only index.json and the first sample, and no check while training.
    verify_shards: VerifyShards = "size"
    # Pretraining rows concatenate documents, each ending with this token (100257, <|endoftext|>, as
    # data_prep/ writes them): batches then carry `sequence_id`, a new document after each one, and the model
    # keeps the documents apart (model.attn_config.attn_uses_sequence_id). null: plain concatenation, every
    # token attends to the whole row before it (DBRX's pretraining convention).
    eos_token_id: int | None = None


@dataclass
class TextLoaderConfig:
    name: Literal["text"] = "text"  # pretraining data: fixed-length token sequences (MDS `tokens`)
    dataset: TextDatasetConfig = field(default_factory=TextDatasetConfig)
    drop_last: bool = True  # drop an epoch's last incomplete device batch
    num_workers: int = 0  # DataLoader worker processes; 0: load in the training process
    pin_memory: bool = False  # put batches in page-locked memory (faster copies to the GPU)
    prefetch_factor: int | None = None  # batches each worker loads ahead; only with num_workers > 0
    persistent_workers: bool = False  # keep workers alive between epochs; only with num_workers > 0
    timeout: float = 0.0  # seconds to wait for a batch from a worker; 0: no limit


@dataclass
class _ResolvedStream:
    """A stream with the dataset-level defaults applied and a name for error messages."""

    key: str  # e.g. "train_loader.dataset.streams.code"
    local: str
    remote: str | None
    split: str | None
    proportion: float | None

    @property
    def folder(self) -> Path:
        return Path(self.local, self.split) if self.split else Path(self.local)

    @property
    def remote_folder(self) -> Path | None:
        """The `remote` folder when it is a path on this machine (no scheme such as s3://), else None."""
        if self.remote is None or "://" in self.remote:
            return None
        return Path(self.remote, self.split) if self.split else Path(self.remote)


def resolve_streams(dataset: TextDatasetConfig, config_key: str) -> list[_ResolvedStream]:
    key = f"{config_key}.dataset"
    if dataset.streams is not None:
        if dataset.local is not None or dataset.remote is not None:
            raise ValueError(f"{key}: set either `streams` or `local`/`remote`, not both")
        if not dataset.streams:
            raise ValueError(f"{key}.streams is empty; name at least one stream")
        streams = [
            _ResolvedStream(
                key=f"{key}.streams.{name}",
                local=stream.local,
                remote=stream.remote,
                split=stream.split if stream.split is not None else dataset.split,
                proportion=stream.proportion,
            )
            for name, stream in dataset.streams.items()
        ]
    elif dataset.local is not None:
        streams = [_ResolvedStream(key, dataset.local, dataset.remote, dataset.split, None)]
    else:
        raise ValueError(f"{key}: set `local` (an MDS folder) or `streams` (named MDS folders)")

    for stream in streams:
        if not stream.local:
            raise ValueError(f"{stream.key}.local is empty; it must name the local MDS folder")
        if stream.proportion is not None and stream.proportion < 0:
            raise ValueError(f"{stream.key}.proportion is {stream.proportion}; it must be >= 0")
    with_proportion = [s.key for s in streams if s.proportion is not None]
    if with_proportion and len(with_proportion) != len(streams):
        missing = [s.key for s in streams if s.proportion is None]
        raise ValueError(f"give `proportion` to every stream or to none; missing in {missing}")
    if with_proportion and sum(s.proportion for s in streams) <= 0:
        raise ValueError(f"{key}.streams: proportions sum to 0; at least one must be positive")
    folders = [str(s.folder.resolve()) for s in streams]
    if len(set(folders)) != len(folders):
        raise ValueError(f"{key}.streams: two streams read the same folder ({folders}); Streaming forbids it")
    return streams


class LoaderConfig(Protocol):
    """What the streaming loader builder needs; TextLoaderConfig and FinetuningLoaderConfig both fit."""

    name: str
    dataset: TextDatasetConfig
    drop_last: bool
    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None
    persistent_workers: bool
    timeout: float


def validate_loader_options(cfg: LoaderConfig, config_key: str) -> None:
    dataset = cfg.dataset
    if dataset.eos_token_id is not None and dataset.eos_token_id < 0:
        raise ValueError(f"{config_key}.dataset.eos_token_id must be a token id (>= 0) or null")
    if dataset.shuffle_algo not in shuffle_algos:
        raise ValueError(
            f"{config_key}.dataset.shuffle_algo {dataset.shuffle_algo!r} is not one of {sorted(shuffle_algos)}"
        )
    if dataset.download_timeout <= 0:
        raise ValueError(f"{config_key}.dataset.download_timeout must be > 0")
    if cfg.num_workers < 0:
        raise ValueError(f"{config_key}.num_workers must be >= 0")
    if cfg.num_workers == 0 and (cfg.prefetch_factor is not None or cfg.persistent_workers):
        raise ValueError(
            f"{config_key}.prefetch_factor / persistent_workers need worker processes: "
            f"set {config_key}.num_workers > 0 or remove them"
        )


def stream_names(cfg: LoaderConfig) -> list[str]:
    """The stream names of a `streams:` mixture in order (= each sample's `stream_id`), or []."""
    return list(cfg.dataset.streams or {})


def folders_to_check(dataset: TextDatasetConfig, config_key: str) -> Iterator[tuple[str, Path, str, bool]]:
    """(stream key, folder, name for messages, is a remote) of each stream whose data is on this
    machine: its `local` folder, or its `remote` when that is a local path. A stream with a remote
    URL (s3://...) is checked when its loader is built, after Streaming has downloaded its index."""
    for stream in resolve_streams(dataset, config_key):
        if stream.remote is None:
            yield stream.key, stream.folder, stream.key, False
        elif stream.remote_folder is not None:
            yield stream.key, stream.remote_folder, f"{stream.key}.remote", True


def validate_text_dataset_config(
    cfg: TextLoaderConfig,
    max_seq_len: int,
    vocab_size: int,
    *,
    config_key: str = "train_loader",
    verify_shards: str | None = None,
) -> dict[str, TokenMDSInfo]:
    """Check the loader config and each stream's data on this machine (index, columns, shard files,
    the first sample's length and ids; see `folders_to_check`) without building a loader.

    `config_key` prefixes error messages (e.g. "eval_loader"). `verify_shards` overrides the
    config's level. Returns what was found per checked stream key."""
    if cfg.name != "text":
        raise ValueError(f"{config_key}.name is {cfg.name!r}; the pretraining loader is 'text'")
    return check_local_streams(cfg, check_token_mds, max_seq_len, vocab_size, config_key, verify_shards)


def check_local_streams(
    cfg: LoaderConfig,
    check: Callable[..., Any],
    max_seq_len: int,
    vocab_size: int,
    config_key: str,
    verify_shards: str | None,
) -> dict[str, Any]:
    """The loader options, then `check` (check_token_mds / check_finetuning_mds) on each local stream."""
    validate_loader_options(cfg, config_key)
    level = verify_shards or cfg.dataset.verify_shards
    return {
        key: check(
            folder,
            max_seq_len=max_seq_len,
            vocab_size=vocab_size,
            name=name,
            verify_shards=level,
            remote=remote,
        )
        for key, folder, name, remote in folders_to_check(cfg.dataset, config_key)
    }


def stream_id_of(dataset: StreamingDataset, idx: int) -> torch.Tensor:
    """Which stream sample `idx` comes from, as a 0-d tensor, so callbacks can count the mix."""
    shard_id, _ = dataset.spanner[idx]
    return torch.tensor(int(dataset.stream_per_shard[shard_id]))


class ModelSampleDataset(GuardedStreamingDataset):
    """What the text and fine-tuning datasets share: the limits each sample is checked against, and
    what every sample carries besides its tokens (its stream, for the data-mix counters; its global
    index, for callbacks.sample_log)."""

    def __init__(
        self,
        *,
        max_seq_len: int,
        vocab_size: int,
        stream_keys: list[str] | None = None,
        eos_token_id: int | None = None,
        **streaming_kwargs: Any,
    ):
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        super().__init__(stream_keys=stream_keys, **streaming_kwargs)

    def provenance(self, idx: int) -> dict[str, torch.Tensor]:
        return {"stream_id": stream_id_of(self, idx), "sample_idx": torch.tensor(idx)}


def documents_after(input_ids_T: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Sequence ids of a concatenated row: 0 up to and including the first EOS, then 1, ... (as LLM
    Foundry's ConcatenatedSequenceCollatorWrapper in EOS mode)."""
    ends_T = (input_ids_T == eos_token_id).long()
    return ends_T.cumsum(0) - ends_T


class TokenSequenceDataset(ModelSampleDataset):
    """A StreamingDataset of fixed-length token sequences, checked as they are read."""

    def get_item(self, idx: int, retry: int = 7) -> dict[str, torch.Tensor]:
        sample = super().get_item(idx, retry)
        try:
            ids = sample_token_ids(sample)
            legacy = TOKENS_COLUMN not in sample and LEGACY_BYTES_COLUMN in sample
            problem = find_token_problem(ids, self.max_seq_len, self.vocab_size, legacy_bytes=legacy)
        except ValueError as error:
            problem = str(error)
        if problem:
            raise ShardReadError(f"{self.describe_sample(idx)} {problem}.")
        input_ids = torch.from_numpy(ids.astype("int64"))
        if self.eos_token_id is None:
            return {"input_ids": input_ids, **self.provenance(idx)}
        return {
            "input_ids": input_ids,
            "sequence_id": documents_after(input_ids, self.eos_token_id),
            **self.provenance(idx),
        }


def build_text_dataloader(
    cfg: TextLoaderConfig,
    *,
    device_batch_size: int,
    max_seq_len: int,
    vocab_size: int,
    seed: int,
    config_key: str = "train_loader",
    choose: dict[str, int] | None = None,
) -> StreamingDataLoader:
    """A resumable loader of `{"input_ids": (device_batch_size, max_seq_len) int64, "stream_id": (B,)}`
    batches, shuffled with `seed`. Checks the data first (see `validate_text_dataset_config`; the
    costly `verify_shards` levels ran once before training, here only sizes are checked again).
    `choose` (samples per stream and epoch, by stream name) overrides the streams' proportions."""
    validate_text_dataset_config(
        cfg,
        max_seq_len,
        vocab_size,
        config_key=config_key,
        verify_shards=at_most_size(cfg.dataset.verify_shards),
    )
    return build_streaming_loader(
        cfg,
        TokenSequenceDataset,
        {"max_seq_len": max_seq_len, "vocab_size": vocab_size, "eos_token_id": cfg.dataset.eos_token_id},
        device_batch_size=device_batch_size,
        seed=seed,
        config_key=config_key,
        choose=choose,
    )


def build_streaming_loader(
    cfg: LoaderConfig,
    dataset_class: type[GuardedStreamingDataset],
    dataset_kwargs: dict[str, Any],
    *,
    device_batch_size: int,
    seed: int,
    config_key: str,
    choose: dict[str, int] | None = None,
    collate_fn: Callable[[list[dict]], dict] | None = None,
) -> StreamingDataLoader:
    """The Streaming loader shared by pretraining and fine-tuning data; `dataset_class` decodes samples."""
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    dataset_cfg = cfg.dataset
    resolved = resolve_streams(dataset_cfg, config_key)
    if choose is not None:
        names = stream_names(cfg)
        if sorted(choose) != sorted(names):
            raise ValueError(
                f"{config_key}: samples per stream given for {sorted(choose)}, streams are {names}"
            )
        weights = [{"choose": choose[name]} for name in names]
    else:
        weights = [{"proportion": s.proportion} for s in resolved]
    dataset = dataset_class(
        **dataset_kwargs,
        stream_keys=[s.key for s in resolved],
        verify_on_read=dataset_cfg.verify_shards != "none",
        streams=[
            CheckedStream(key=s.key, local=s.local, remote=s.remote, split=s.split, **weight)
            for s, weight in zip(resolved, weights, strict=True)
        ],
        download_timeout=dataset_cfg.download_timeout,
        validate_hash=dataset_cfg.validate_hash,
        keep_zip=dataset_cfg.keep_zip,
        predownload=dataset_cfg.predownload,
        num_canonical_nodes=dataset_cfg.num_canonical_nodes,
        # Streaming partitions samples into whole per-device batches; it needs the batch size
        # for that partition (and so the resumption point) to be deterministic.
        batch_size=device_batch_size,
        shuffle=dataset_cfg.shuffle,
        shuffle_algo=dataset_cfg.shuffle_algo,
        shuffle_seed=seed if dataset_cfg.shuffle_seed is None else dataset_cfg.shuffle_seed,
        shuffle_block_size=dataset_cfg.shuffle_block_size,
    )
    # Remote streams could not be checked before their index was downloaded; read their first
    # sample now so a wrong length or vocabulary fails here rather than mid-training.
    for stream_id, stream in enumerate(resolved):
        if stream.remote is not None:
            dataset[int(dataset.sample_offset_per_stream[stream_id])]
    if cfg.drop_last and len(dataset) < device_batch_size:
        raise ValueError(
            f"{config_key}: this rank gets {len(dataset)} samples per epoch, fewer than device_batch_size="
            f"{device_batch_size}, so with drop_last there would be no batch at all. Prepare more data, "
            f"lower the batch size, or set {config_key}.drop_last: false"
        )
    return StreamingDataLoader(
        dataset,
        batch_size=device_batch_size,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor,
        persistent_workers=cfg.persistent_workers,
        timeout=cfg.timeout,
        collate_fn=collate_fn,
    )
