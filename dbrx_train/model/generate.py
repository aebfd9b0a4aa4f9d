"""Autoregressive sampling from a DbrxForCausalLM: batched prompts, KV cache, greedy/temperature/
top-k/top-p, stop at any EOS id.

Prompts of different lengths are left-padded into one batch with an attention mask; the model
counts positions over real tokens only and never attends to padding, so each prompt continues as
if it were alone. With the cache, the prompt is prefilled once and each step feeds one token per
sequence; without it every step re-runs the whole sequence (the reference the cache is tested
against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dbrx_train.model.dbrx import DbrxForCausalLM, KVCache
from dbrx_train.vocab import EOS_TOKEN_IDS

# What fills left padding and the rows of finished sequences: any id works (it is masked out or
# never read), 0 exists in every vocabulary.
FILLER_ID = 0


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    eos_token_ids: tuple[int, ...] = EOS_TOKEN_IDS
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(
    logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """(B,) token ids from last-position logits."""
    logits_BV = logits_BV.float()
    if cfg.temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / cfg.temperature
    if cfg.top_k > 0:
        kth_B1 = torch.topk(logits_BV, min(cfg.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cumulative_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted_BV = (cumulative_BV - sorted_BV.softmax(dim=-1)) >= cfg.top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DbrxForCausalLM,
    prompts: list[list[int]],
    cfg: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    finished: Callable[[list[int]], bool] | None = None,
    all_finished: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """New token ids per prompt, each ending with its EOS id if one was produced.

    `finished(new_ids)` can end a sequence early (e.g. at a stop string). `all_finished(done_here)`
    decides when to stop stepping; ranks of a sharded model pass one that agrees over all ranks, so
    each runs the same number of forwards (by default: when every sequence here is done)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    total = T0 + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({T0}) + max_new_tokens ({cfg.max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}"
        )
    was_training = model.training
    model.eval()
    ids_BT = torch.full((B, total), FILLER_ID, dtype=torch.long, device=device)
    mask_BT = torch.zeros(B, total, dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):  # left padding
        ids_BT[b, T0 - len(prompt) : T0] = torch.tensor(prompt, device=device)
        mask_BT[b, T0 - len(prompt) : T0] = True
    mask_BT[:, T0:] = True  # generated positions are real tokens (after EOS they are ignored)
    cache = KVCache(model.config, B, total, device, model.lm_head.weight.dtype) if cfg.use_cache else None
    eos_ids = torch.tensor(cfg.eos_token_ids, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    t = T0
    all_finished = all_finished or (lambda done_here: done_here)
    while t < total and not all_finished(bool(done_B.all())):
        start = 0 if cache is None else cache.length
        last_B1 = torch.full((B, 1), t - start - 1, dtype=torch.long, device=device)  # only it is sampled
        logits = model(
            ids_BT[:, start:t], attention_mask=mask_BT[:, :t], past_key_values=cache, logits_positions=last_B1
        ).logits
        token_B = next_token(logits[:, -1], cfg, generator)
        token_B = torch.where(done_B, torch.full_like(token_B, FILLER_ID), token_B)
        ids_BT[:, t] = token_B
        for b in (~done_B).nonzero().flatten().tolist():
            out[b].append(int(token_B[b]))
            if finished is not None and finished(out[b]):
                done_B[b] = True
        done_B |= torch.isin(token_B, eos_ids)
        t += 1
    model.train(was_training)
    return out
