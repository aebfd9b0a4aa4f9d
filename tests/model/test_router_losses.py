"""Router losses and statistics: only real tokens count; step-wide (global) balancing is independent of
the microbatch size; z-loss; bias balancing moves the top-k choice but not the mixing weights."""

import pytest
import torch

from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model.dbrx import RouterTotals, topk_change_without_expert_bias
from dbrx_train.model.hf import ExpertBiasError, check_hf_folder, save_pretrained
from dbrx_train.model.moe import route

V, T = 128, 16


def tiny(**ffn) -> DbrxForCausalLM:
    config = DbrxConfig.from_dict(
        {
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 24,
            "vocab_size": V,
            "attn_config": {"kv_n_heads": 2},
            "ffn_config": {
                "ffn_hidden_size": 32,
                "moe_num_experts": 8,
                "moe_top_k": 2,
                "moe_backend": "torch",
                "moe_loss_weight": 0.1,
                **ffn,
            },
        }
    )
    model = DbrxForCausalLM(config)
    model.init_weights(seed=0)
    return model


def batch(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def counts(out) -> list[list[int]]:
    return [s.counts_E.tolist() for s in out.router_stats]


def test_padding_changes_neither_the_balancing_loss_nor_the_expert_counts():
    model = tiny(moe_z_loss_weight=1e-3)
    ids = batch(3)
    padded = torch.cat([ids, torch.full((3, 8), 5)], dim=1)
    seq = torch.cat([torch.zeros(3, T, dtype=torch.long), torch.full((3, 8), -1)], dim=1)
    labels = padded.masked_fill(seq < 0, -100)
    with torch.no_grad():
        plain = model(ids, labels=ids)
        with_pad = model(padded, labels=labels, sequence_id=seq)
        pad_counted = model(padded, labels=labels)  # no sequence_id: the padding counts
    torch.testing.assert_close(with_pad.aux_loss, plain.aux_loss, atol=1e-7, rtol=0)
    torch.testing.assert_close(with_pad.z_loss, plain.z_loss, atol=1e-7, rtol=0)
    assert counts(with_pad) == counts(plain)
    assert [int(s.tokens) for s in with_pad.router_stats] == [3 * T] * 2
    assert counts(pad_counted) != counts(plain)


def test_targets_only_counts_the_trained_tokens():
    model = tiny(moe_balance_tokens="targets")
    ids = batch(2)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert [int(s.tokens) for s in out.router_stats] == [2 * (T - 6)] * 2
    assert [sum(c) for c in counts(out)] == [2 * (T - 6) * 2] * 2


def test_z_loss_is_the_weighted_mean_squared_logsumexp_and_joins_the_loss():
    model = tiny(moe_z_loss_weight=1e-2)
    model.config.output_router_logits = True
    ids = batch(2)
    out = model(ids, labels=ids)
    want = torch.stack([torch.logsumexp(z.float(), -1).square().mean() for z in out.router_logits]).mean()
    torch.testing.assert_close(out.z_loss, 1e-2 * want)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)


def step_totals(model, microbatches: list[torch.Tensor], samples: int) -> RouterTotals:
    """What training/router_balance.py sums over microbatches (and ranks) before a step."""
    with torch.no_grad():
        stats = [model(mb, labels=mb, router_only=True).router_stats for mb in microbatches]
    counts_LE = sum(torch.stack([s.counts_E for s in st]) for st in stats)
    return RouterTotals(counts_LE, sum(st[0].tokens for st in stats), samples)


def step(model, ids: torch.Tensor, microbatch: int, scope: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step's loss and gradients as Composer computes them: each microbatch's loss weighted by its
    share of the samples, gradients accumulated."""
    model.zero_grad()
    microbatches = list(ids.split(microbatch))
    totals = step_totals(model, microbatches, len(ids)) if scope == "global" else None
    aux = 0.0
    for mb in microbatches:
        out = model(mb, labels=mb, router_totals=totals)
        share = len(mb) / len(ids)
        (out.loss * share).backward()
        aux = aux + (out.aux_loss + out.z_loss).detach() * share
    return aux, [p.grad.clone() for p in model.parameters()]


def test_global_scope_gives_the_same_loss_and_gradients_for_microbatch_2_and_8():
    model = tiny(moe_loss_scope="global", moe_z_loss_weight=1e-2, moe_loss_weight=1.0)
    ids = batch(8)
    aux_8, grads_8 = step(model, ids, 8, "global")
    aux_2, grads_2 = step(model, ids, 2, "global")
    torch.testing.assert_close(aux_2, aux_8, atol=1e-6, rtol=0)
    for g2, g8 in zip(grads_2, grads_8, strict=True):
        torch.testing.assert_close(g2, g8, atol=1e-6, rtol=0)
    # per-microbatch statistics are another loss: the equality above is not a tautology
    aux_mb, grads_mb = step(model, ids, 2, "microbatch")
    assert (aux_mb - aux_8).abs() > 1e-4
    assert max((a - b).abs().max() for a, b in zip(grads_mb, grads_8, strict=True)) > 1e-5


def test_bias_moves_the_choice_but_not_the_mixing_weights():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    plain = route(x, w, top_k=2, normalize_p=None)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # expert 3 always wins the choice
    biased = route(x, w, top_k=2, normalize_p=None, expert_bias_E=bias)
    assert (biased.experts_Nk == 3).any(-1).all()
    torch.testing.assert_close(biased.weights_Nk, plain.probs_NE.gather(-1, biased.experts_Nk))
    torch.testing.assert_close(biased.probs_NE, plain.probs_NE)


def test_expert_bias_is_model_state_and_an_hf_export_refuses_it_unless_dropped(tmp_path):
    assert not any("expert_bias" in k for k in tiny().state_dict())
    model = tiny(moe_bias_update_rate=1e-3)
    biases = {k: v for k, v in model.state_dict().items() if k.endswith("router.expert_bias")}
    assert len(biases) == 2 and all(not b.any() for b in biases.values())
    save_pretrained(model, tmp_path / "zero", tokenizer=False)  # zero biases change nothing: allowed
    ids = batch(4)
    same = topk_change_without_expert_bias(model, lambda: model(ids, router_only=True))
    assert same[:, 0].tolist() == [0, 0] and same[:, 1].tolist() == [4 * T] * 2

    model.transformer.blocks[0].ffn.router.expert_bias[0] = 0.5
    with pytest.raises(ExpertBiasError, match="drop-expert-bias"):
        save_pretrained(model, tmp_path / "refused", tokenizer=False)
    save_pretrained(model, tmp_path / "dropped", tokenizer=False, drop_expert_bias=True)
    check_hf_folder(tmp_path / "dropped")  # exactly HF DBRX's tensors
    changed = topk_change_without_expert_bias(model, lambda: model(ids, router_only=True))
    assert changed[0, 0] > 0 and changed[1, 0] == 0  # only layer 0 has a bias
