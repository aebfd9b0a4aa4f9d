"""Document masking of packed rows: each document of a row computes exactly what it computes alone."""

import warnings

import pytest
import torch

from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model.dbrx import (
    DbrxAttention,
    RotaryEmbedding,
    document_labels,
    document_layout,
    document_positions,
)

LENGTHS = (5, 11, 13)  # three documents packed into one row of 29, then 3 padding tokens
T = 32


def tiny(**attn) -> DbrxForCausalLM:
    config = DbrxConfig.from_dict(
        {
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": T,
            "vocab_size": 128,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 500000.0, **attn},
            "ffn_config": {
                "ffn_hidden_size": 32,
                "moe_num_experts": 4,
                "moe_top_k": 2,
                "moe_backend": "torch",
            },
        }
    )
    model = DbrxForCausalLM(config)
    model.init_weights(seed=0)
    return model.eval()


def packed_row() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 128, (n,), generator=gen) for n in LENGTHS]
    ids = torch.cat([*docs, torch.zeros(T - sum(LENGTHS), dtype=torch.long)])
    seq = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(LENGTHS)] + [torch.full((T - sum(LENGTHS),), -1)]
    )
    return docs, ids[None], seq[None]


def test_positions_restart_and_boundaries_are_not_targets():
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    positions, starts = document_positions(seq)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert starts.tolist() == [[True, False, False, True, False, True, True, False]]
    labels = torch.arange(8)[None]
    # position 2 (doc 0's last) would be scored against token 3 (doc 1's first): never
    assert document_labels(labels, seq).tolist() == [[-100, 1, 2, -100, 4, -100, -100, 7]]


def test_each_packed_document_equals_itself_alone():
    model = tiny()
    docs, ids, seq = packed_row()
    with torch.no_grad():
        packed = model(ids, labels=ids.masked_fill(seq < 0, -100), sequence_id=seq)
        alone = [model(doc[None], labels=doc[None]) for doc in docs]
    start = 0
    for doc, out in zip(docs, alone, strict=True):
        torch.testing.assert_close(
            packed.logits[0, start : start + len(doc)], out.logits[0], atol=1e-5, rtol=0
        )
        start += len(doc)
    # the LM loss is the token-weighted mean of the documents' losses: nothing crosses a boundary
    targets = [n - 1 for n in LENGTHS]
    want = sum(o.lm_loss * t for o, t in zip(alone, targets, strict=True)) / sum(targets)
    torch.testing.assert_close(packed.lm_loss, want, atol=1e-5, rtol=0)
    # without masking the later documents see the earlier ones
    with torch.no_grad():
        unmasked = tiny(attn_uses_sequence_id=False)(ids, sequence_id=seq).logits
    assert (unmasked[0, LENGTHS[0] : sum(LENGTHS[:2])] - alone[1].logits[0]).abs().max() > 1e-3


def test_one_document_then_padding_takes_the_plain_causal_path():
    seq = torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]])
    assert document_layout(seq, "sdpa") == (None, None)
    positions, mask = document_layout(torch.tensor([[0, 0, 1, 1]]), "sdpa")
    assert positions.tolist() == [[0, 1, 0, 1]]
    assert mask[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_flex_block_mask_attends_like_the_sdpa_mask():
    """The CUDA kernel's BlockMask, run by FlexAttention's reference (eager, CPU) implementation."""
    config = tiny().config
    attention = DbrxAttention(config)
    torch.nn.init.normal_(attention.Wqkv.weight, std=0.2)
    rotary = RotaryEmbedding(config.head_dim, T, 500000.0)
    rotary.init_weights()
    _, _, seq = packed_row()
    seq = torch.cat([seq, torch.zeros_like(seq)])  # a second row: one document, no padding
    seq[1, 20:] = 1
    x = torch.randn(2, T, config.d_model, generator=torch.Generator().manual_seed(2))
    outs = {}
    for kernel in ("sdpa", "flex"):
        positions, mask = document_layout(seq, kernel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention without torch.compile: the reference path
            outs[kernel] = attention(x, *rotary.at(positions), mask)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernel runs on CUDA only")
def test_each_packed_document_equals_itself_alone_with_flex_attention_on_cuda():
    model = tiny().cuda()
    docs, ids, seq = packed_row()
    with torch.no_grad():
        packed = model(ids.cuda(), sequence_id=seq.cuda()).logits
        start = 0
        for doc in docs:
            alone = model(doc[None].cuda()).logits
            torch.testing.assert_close(packed[0, start : start + len(doc)], alone[0], atol=1e-5, rtol=0)
            start += len(doc)
