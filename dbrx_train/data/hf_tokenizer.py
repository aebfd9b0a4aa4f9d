"""Our tiktoken tokenizer as a Hugging Face fast tokenizer, built offline from the cl100k ranks.

`tokenizer.json` is a byte-level BPE (`tokenizers`): the vocabulary is every cl100k token's bytes
through GPT-2's bytes_to_unicode map, at its tiktoken rank; the merges are recovered from the ranks
(each token of rank r is the merge of two shorter tokens, listed in rank order); `ignore_merges`
makes a pre-token that is itself a vocabulary entry one token, as tiktoken does; cl100k's split
regex is the pre-tokenizer. Special tokens keep their tiktoken ids (100257..100279; the unused ids
between them and the padding rows 100280..100351 have no token). This is what
transformers' `TikTokenConverter` does, without its download path.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from dbrx_train import compat
from dbrx_train.data.chat import CHAT_TEMPLATE
from dbrx_train.data.tokenizer import CL100K_PATTERN, DbrxTokenizer, load_tokenizer

# Oniguruma (tokenizers' regex engine) reads `{1,3}+` as "one or more of {1,3}", not as a
# possessive {1,3} as tiktoken does; nothing follows it in its alternative, so plain {1,3} is the
# same match.
HF_SPLIT_PATTERN = CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
assert HF_SPLIT_PATTERN != CL100K_PATTERN


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        pairs = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        # Among the ways to build this token, BPE applies the one whose parts appear first.
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(left, right, rank) for left, right in pairs]
    merges.sort(key=lambda m: m[2])
    return [(left, right) for left, right, _ in merges]


def build_hf_tokenizer(tokenizer: DbrxTokenizer | None = None) -> PreTrainedTokenizerFast:
    tokenizer = tokenizer or load_tokenizer()
    compat.check("tiktoken_mergeable_ranks")
    ranks = tokenizer.encoding._mergeable_ranks
    byte_to_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    special = tokenizer.special_tokens
    vocab.update(special)  # special tokens take their tiktoken ids (added tokens reuse vocab ids)
    # Name the unused ids below the last special token (tokenizers warns about holes); BPE never
    # produces them: the split regex cuts "<|" from letters, so no pre-token equals one.
    for token_id in set(range(max(special.values()) + 1)) - set(vocab.values()):
        vocab[f"<|unused_{token_id}|>"] = token_id
    merges = [(to_str(a), to_str(b)) for a, b in _merges_from_ranks(ranks)]
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(HF_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=[t for t in special if t not in ("<|endoftext|>", "<|pad|>")],
    )
    for token, token_id in special.items():
        if hf.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(
                f"special token {token} got id {hf.convert_tokens_to_ids(token)}, expected {token_id}"
            )
    return hf


@functools.lru_cache(maxsize=1)
def _cached() -> PreTrainedTokenizerFast:
    return build_hf_tokenizer()


def save_hf_tokenizer(folder: str | Path) -> None:
    """tokenizer.json, tokenizer_config.json (eos, pad, chat_template) and special_tokens_map.json."""
    # save_jinja_files=False: the template goes into tokenizer_config.json, where DBRX Instruct has
    # it and where every transformers version reads it (4.57 would write chat_template.jinja).
    _cached().save_pretrained(str(folder), save_jinja_files=False)
