"""What checking data shards against index.json's hashes costs (issue 20: <= 2% of step time).

    python scripts/bench/bench_shard_verify.py [--corpus data/default] [--gb 1] [--reps 3]

Measured in one run, on the default corpus (built at 128 tokens if --corpus is absent) and on a
synthetic dataset of --gb GB (random int32 tokens, uncompressed 64 MB shards, as big datasets are):

1. Up front (`verify_shards: hash`): hashing every shard file once, xxh3_64 (what our writers record
   and what is checked) and sha1 (all Foundry's writers may record).
2. While reading (the default): one epoch of the default corpus through the training loader with
   the per-shard check on and off, peers interleaved, and the tiny model's training step; and the
   worst case for a big dataset, where every rank hashes every shard it touches once per epoch:
   the dataset's hash time spread over the steps of one epoch, against the same step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from streaming.base.hashing import get_hash

from dbrx_train.config.run import load_config
from dbrx_train.data.text import StreamConfig, TextDatasetConfig, TextLoaderConfig, build_text_dataloader
from dbrx_train.data.token_mds import write_token_mds
from dbrx_train.model import DbrxForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def shard_files(folder: Path) -> list[Path]:
    """The files samples are read from: decompressed shards, or the compressed ones where alone."""
    files = sorted(folder.rglob("*.mds"))
    return files + sorted(p for p in folder.rglob("*.mds.zstd") if p.with_suffix("") not in files)


def hash_all(files: list[Path], algo: str) -> None:
    for path in files:
        get_hash(algo, path.read_bytes())


def synthetic(folder: Path, gigabytes: float, seq: int) -> None:
    rows = int(gigabytes * 2**30 / (seq * 4))
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 100_000, (4096, seq), dtype=np.int32)
    write_token_mds(
        (chunk[i % len(chunk)] for i in range(rows)), folder, compression=None, size_limit=1 << 26
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, help="a default corpus folder (built at 128 tokens if absent)")
    parser.add_argument("--gb", type=float, default=1.0, help="size of the synthetic dataset")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "yamls/pretrain/dbrx-tiny.yaml")
    seq, batch = cfg.max_seq_len, cfg.global_train_batch_size
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "default"
            command = [sys.executable, str(ROOT / "data_prep/build_default_corpus.py"), "--out", str(corpus)]
            subprocess.run([*command, "--max-seq-len", str(seq)], check=True, capture_output=True)
        big = Path(tmp) / "big"
        synthetic(big, args.gb, seq)

        # The training step the check is weighed against.
        torch.manual_seed(0)
        model = DbrxForCausalLM(cfg.model.dbrx)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 100_000, (batch, seq))

        def step() -> None:
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()

        def epoch(verify: bool) -> None:
            streams = {
                name: StreamConfig(local=str(corpus / name), split="train", proportion=0.5)
                for name in ("prose", "code")
            }
            dataset = TextDatasetConfig(
                streams=streams, num_canonical_nodes=1, verify_shards="size" if verify else "none"
            )
            loader = build_text_dataloader(
                TextLoaderConfig(dataset=dataset),
                device_batch_size=batch,
                max_seq_len=seq,
                vocab_size=100352,
                seed=0,
            )
            for _ in loader:
                pass

        epoch(True)  # decompress the shards once, as a first run does
        corpus_files = shard_files(corpus / "prose") + shard_files(corpus / "code")
        big_files = shard_files(big)
        corpus_bytes = sum(p.stat().st_size for p in corpus_files)
        big_bytes = sum(p.stat().st_size for p in big_files)
        times: dict[str, list[float]] = {
            k: [] for k in ("step", "on", "off", "c_xxh", "c_sha", "b_xxh", "b_sha")
        }
        for _ in range(args.reps):
            times["step"].append(timed(step))
            times["off"].append(timed(lambda: epoch(False)))
            times["on"].append(timed(lambda: epoch(True)))
            times["c_xxh"].append(timed(lambda: hash_all(corpus_files, "xxh3_64")))
            times["c_sha"].append(timed(lambda: hash_all(corpus_files, "sha1")))
            times["b_xxh"].append(timed(lambda: hash_all(big_files, "xxh3_64")))
            times["b_sha"].append(timed(lambda: hash_all(big_files, "sha1")))
        m = {k: statistics.median(v) for k, v in times.items()}
        steps_per_epoch = corpus_bytes / (batch * seq * 4)  # tokens are int32 in the shards
        big_steps = big_bytes / (batch * seq * 4)
        shutil.rmtree(big)

    print(f"shard verification, 2 threads, median of {args.reps}; step = dbrx-tiny, {batch} x {seq} tokens")
    print(f"  training step                                   {m['step'] * 1e3:9.1f} ms")
    print(f"  default corpus: {corpus_bytes / 2**20:.1f} MiB in {len(corpus_files)} shard files")
    print(
        f"    up front, xxh3_64 / sha1                      {m['c_xxh'] * 1e3:9.1f} ms / {m['c_sha'] * 1e3:.1f} ms"
    )
    print(f"    one loader epoch, check off                   {m['off'] * 1e3:9.1f} ms")
    print(
        f"    one loader epoch, check on (the default)      {m['on'] * 1e3:9.1f} ms  ({m['on'] / m['off']:.2f}x)"
    )
    extra = max(m["on"] - m["off"], 0.0) / steps_per_epoch
    print(
        f"    per step, spread over the epoch               {extra * 1e6:9.1f} us = {extra / m['step']:.4%} of a step"
    )
    print(f"  synthetic: {big_bytes / 2**30:.2f} GiB in {len(big_files)} shard files of 64 MB")
    print(f"    up front, xxh3_64 / sha1                      {m['b_xxh']:9.2f} s / {m['b_sha']:.2f} s")
    worst = m["b_xxh"] / big_steps
    print(
        f"    while reading, every shard hashed once per epoch: {worst * 1e6:.2f} us per step = "
        f"{worst / m['step']:.4%} of a step (goal <= 2%); one 64 MB shard "
        f"{m['b_xxh'] / len(big_files) * 1e3:.0f} ms at its first read"
    )


if __name__ == "__main__":
    main()
