"""The two kinds of training data behind one interface, chosen by the loader's `name`.

name: text        pretraining: fixed-length token sequences (data/text.py)
name: finetuning  conversations with a loss mask, padded per sample (data/finetuning.py)
"""

from __future__ import annotations

from typing import Any

from streaming import StreamingDataLoader

from dbrx_train.data.finetuning import (
    FinetuningLoaderConfig,
    build_finetuning_dataloader,
    validate_finetuning_dataset_config,
)
from dbrx_train.data.finetuning_files import as_mds
from dbrx_train.data.text import TextLoaderConfig, build_text_dataloader, validate_text_dataset_config

LoaderConfig = TextLoaderConfig | FinetuningLoaderConfig


def validate_loader_config(
    cfg: LoaderConfig, max_seq_len: int, vocab_size: int, *, config_key: str = "train_loader"
) -> dict[str, Any]:
    """Check the options and each local stream's index and first sample; errors name the stream.
    hf_name files are checked in their tokenized form (`finetuning_files.tokenize_once` made it)."""
    if isinstance(cfg, FinetuningLoaderConfig):
        cfg = as_mds(cfg, max_seq_len, config_key)
        return validate_finetuning_dataset_config(cfg, max_seq_len, vocab_size, config_key=config_key)
    return validate_text_dataset_config(cfg, max_seq_len, vocab_size, config_key=config_key)


def build_dataloader(cfg: LoaderConfig, **kwargs: Any) -> StreamingDataLoader:
    """`build_text_dataloader` or `build_finetuning_dataloader`, by the type of `cfg`."""
    if isinstance(cfg, FinetuningLoaderConfig):
        cfg = as_mds(cfg, kwargs["max_seq_len"], kwargs.get("config_key", "train_loader"))
        return build_finetuning_dataloader(cfg, **kwargs)
    return build_text_dataloader(cfg, **kwargs)
