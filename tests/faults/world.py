"""The shared fixture of the fault suite: everything a user has on disk before something goes wrong.

Built once per session in a few seconds: a 512-token vocabulary and 16-token samples keep every
dataset and checkpoint small (a checkpoint is ~1 MB), so each case copies what it needs and runs
the real tools on it (train.py, the data-prep scripts, convert_to_hf.py, generate.py, model_stats.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from dbrx_train.data.token_mds import SHARD_HASHES, write_token_mds
from tests.training.test_train_e2e import ROOT, TINY

VOCAB, SEQ = 512, 16
# dbrx-tiny.yaml (its layout: prose/code streams, a curriculum, eval) at the smallest size that is still
# the architecture: GQA, 4 experts top-2, one block; every checkpoint kept (a case checks each one's bytes);
# no curriculum, so checkpoints are ep0-ba1, ep0-ba2.
TINY_RUN = [
    "precision=fp32",  # pinned, as test_train_e2e.SMALL
    "callbacks.speed_monitor.peak_flops=null",  # no MFU, as test_train_e2e.SMALL
    f"max_seq_len={SEQ}",
    f"model.vocab_size={VOCAB}",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.attn_config.kv_n_heads=1",
    "model.ffn_config.ffn_hidden_size=32",
    "model.ffn_config.moe_num_experts=4",
    "model.ffn_config.moe_top_k=2",
    "global_train_batch_size=4",
    "device_train_microbatch_size=4",
    "device_eval_batch_size=4",
    "eval_subset_num_batches=1",
    "eval_interval=100ba",
    "console_log_interval=1ba",
    "loggers.wandb=null",
    "callbacks.expert_load=null",
    "callbacks.speed_monitor.window_size=1",
    "curriculum=null",
    "icl_tasks=null",
    "eval_gauntlet=null",
    "save_interval=1ba",
    "save_num_checkpoints_to_keep=-1",
    "max_duration=2ba",
]


def train_args(data_root: Path, save_folder: Path, *overrides: str) -> list[str]:
    return [
        str(TINY),
        f"variables.data_root={data_root}",
        f"save_folder={save_folder}",
        *TINY_RUN,
        *overrides,
    ]


def token_rows(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, SEQ, dtype=np.int32) for _ in range(count)]


def write_stream(folder: Path, rows: list[np.ndarray], *, compression: str | None = "zstd") -> Path:
    write_token_mds(rows, folder, compression=compression, size_limit=1 << 12)  # ~60 samples per shard
    return folder


def write_chat_stream(folder: Path, count: int, seed: int) -> Path:
    """Fine-tuning samples (input_ids, labels) in the small vocabulary."""
    rng = np.random.default_rng(seed)
    columns = {"input_ids": "ndarray:int32", "labels": "ndarray:int32"}
    with MDSWriter(columns=columns, out=str(folder), compression="zstd", hashes=SHARD_HASHES) as writer:
        for _ in range(count):
            ids = rng.integers(0, VOCAB, SEQ - 4, dtype=np.int32)
            labels = np.where(np.arange(len(ids)) >= len(ids) // 2, ids, -100).astype(np.int32)
            writer.write({"input_ids": ids, "labels": labels})
    return folder


@dataclass(frozen=True)
class World:
    root: Path
    data: Path  # prose/code x train/val (text) + chat/train (fine-tuning), small vocabulary
    run: Path  # a finished 2-batch run: ep0-ba1, ep0-ba2, config.yaml, metrics.jsonl
    export: Path  # convert_to_hf of run/ep0-ba2 (no tokenizer files)
    texts: Path  # .txt/.jsonl documents, and chats.jsonl, for the data-prep scripts
    text_mds: Path  # convert_text_to_mds of texts/*.txt
    chat_mds: Path  # convert_finetuning_dataset of texts/chats.jsonl


def quiet(fn, *args) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fn(*args)


def script_main(path: str) -> Callable[[list[str]], None]:
    """`main` of a script in this repo (data_prep/..., scripts/...), to run it in this process."""
    name = f"_fault_suite_{Path(path).stem}"
    folder = str((ROOT / path).parent)
    if folder not in sys.path:  # as `python data_prep/x.py` does: its sibling modules import
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main


def build_world(root: Path) -> World:
    from dbrx_train.training.train import main as train

    prep_text = script_main("data_prep/convert_text_to_mds.py")
    prep_chat = script_main("data_prep/convert_finetuning_dataset.py")
    convert = script_main("scripts/convert_to_hf.py")

    data = root / "data"
    for i, stream in enumerate(("prose", "code")):
        write_stream(data / stream / "train", token_rows(256, seed=i))
        write_stream(data / stream / "val", token_rows(32, seed=10 + i))
    write_chat_stream(data / "chat" / "train", 64, seed=20)
    run = root / "run"
    quiet(train, train_args(data, run))
    export = root / "export"
    quiet(convert, [str(run / "ep0-ba2"), str(export), "--no-tokenizer", "--dtype", "fp32"])

    texts = root / "texts"
    texts.mkdir()
    for name, topic in (("a.txt", "for"), ("b.txt", "while"), ("c.txt", "with")):
        (texts / name).write_text(f"The {topic} statement in Python. " * 40)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {t}?"},
                {"role": "assistant", "content": f"{t} is a word."},
            ]
        }
        for t in ("for", "while", "with", "if")
    ]
    (texts / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    text_mds, chat_mds = root / "text_mds", root / "chat_mds"
    quiet(prep_text, ["--input", str(texts / "*.txt"), "--out", str(text_mds), "--max-seq-len", "32"])
    quiet(prep_chat, ["--input", str(texts / "chats.jsonl"), "--out", str(chat_mds), "--max-seq-len", "64"])
    return World(root, data, run, export, texts, text_mds, chat_mds)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst
