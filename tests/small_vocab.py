"""The default corpus at a small vocabulary, for the tests of training mechanics.

With DBRX's 100352-token vocabulary, the (B*T, V) logits and the embedding and head (with their AdamW
moments) are most of a test run's time and most of every checkpoint's bytes (~150 MB at d_model 64).
Resume, checkpoints, curriculum, parallelism and disk space do not depend on the vocabulary, so
`default_corpus` (tests/conftest.py) is the real default corpus with every pretraining token id folded
below SMALL_VOCAB, and test_train_e2e.SMALL sets `model.vocab_size` to it.

Folding numbers the ids by their frequency in the train splits: the SMALL_VOCAB - 1 most frequent
stay distinct (77% of the tokens), the rarer ones share the last id. That keeps text-like statistics,
so a run's loss still falls quickly. Samples keep their order and length. The chat set is copied
unchanged: fine-tuning needs the real vocabulary (the loader pads with <|pad|> = 100277); tests that
fine-tune, tokenize or generate text use `real_vocab_corpus` and DBRX's vocabulary.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from dbrx_train.data.token_mds import iter_token_samples, read_index, write_token_mds

SMALL_VOCAB = 1024
TEXT_STREAMS = ("prose", "code")


def _rows(folder: Path) -> list[np.ndarray]:
    return [ids for _, ids in iter_token_samples(folder, read_index(folder, "corpus")["shards"], "corpus")]


def fold_corpus(real: Path, out: Path, vocab_size: int = SMALL_VOCAB) -> Path:
    """`real`'s layout (prose/code x train/val MDS, chat, manifest.json) in `out`, token ids folded."""
    text = {
        (stream, split): _rows(real / stream / split) for stream in TEXT_STREAMS for split in ("train", "val")
    }
    train = [ids for (_, split), rows in text.items() if split == "train" for ids in rows]
    counts = Counter(np.concatenate(train).tolist())
    by_frequency = sorted(counts, key=lambda token: (-counts[token], token))
    table = np.full(max(int(ids.max()) for rows in text.values() for ids in rows) + 1, vocab_size - 1)
    table[by_frequency[: vocab_size - 1]] = np.arange(min(len(by_frequency), vocab_size - 1))
    for (stream, split), rows in text.items():
        write_token_mds((table[ids].astype(np.int32) for ids in rows), out / stream / split)
    for text_folder in ("chat", "icl"):  # conversations and ICL tasks are text: copied unchanged
        shutil.copytree(real / text_folder, out / text_folder)
    manifest = json.loads((real / "manifest.json").read_text())
    manifest["folded_vocab_size"] = vocab_size  # pretraining streams only; see tests/small_vocab.py
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
