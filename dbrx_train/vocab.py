"""DBRX's vocabulary constants, the one place both data/ (tokenizer, loaders) and model/ (loss, HF
export, generation) take them from. Imports nothing."""

from __future__ import annotations

# cl100k_base's own special tokens (tiktoken's ids) and the ones DBRX adds after them.
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
DBRX_ADDED_TOKENS = {
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}

# DBRX's embedding has 100352 rows (a multiple of 128, for matmul efficiency), more than the
# 100280 ids the tokenizer can produce; the extra rows are never targets of real text.
DBRX_VOCAB_SIZE = 100352

# Generation stops at either end of text or end of a chat turn (as databricks/dbrx-instruct).
EOS_TOKEN_IDS = (CL100K_SPECIAL_TOKENS["<|endoftext|>"], DBRX_ADDED_TOKENS["<|im_end|>"])
PAD_TOKEN_ID = DBRX_ADDED_TOKENS["<|pad|>"]

# The label of a position that is not trained (the HF / PyTorch cross-entropy convention).
IGNORE_INDEX = -100
