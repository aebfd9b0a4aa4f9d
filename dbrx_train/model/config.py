"""DBRX model configuration.

Field names and defaults equal `transformers.DbrxConfig` (and its `attn_config` / `ffn_config`
sub-configs) so an HF `config.json` maps onto these dataclasses key for key. The fields HF DBRX
has no place for are ours and are dropped by `to_hf_dict()` (NON_HF_ATTN_KEYS, NON_HF_FFN_KEYS):
LLM Foundry's `attn_uses_sequence_id`, the MegaBlocks benchmarking switch
`uniform_expert_assignment`, `moe_backend`, and the router-balancing options (loss scope, z-loss,
bias balancing, which tokens count).

Plain dataclasses and their value checks (`problems()`), nothing else: dicts (a YAML's `model:`, an
HF config.json) become these through the one converter (`DbrxConfig.from_dict`, `dbrx_train.config.schema.build`), which
names unknown keys and wrong types and then reports `problems()` with the full dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "relu")
# Keys that transformers' DbrxAttentionConfig / DbrxFFNConfig would reject as unknown.
NON_HF_ATTN_KEYS = ("attn_uses_sequence_id",)
NON_HF_FFN_KEYS = (
    "uniform_expert_assignment",
    "moe_backend",
    "moe_loss_scope",
    "moe_z_loss_weight",
    "moe_bias_update_rate",
    "moe_balance_tokens",
)


@dataclass
class DbrxAttentionConfig:
    attn_pdrop: float = 0.0  # dropout probability on the attention weights, in [0, 1); training only
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] after Wqkv; null: no clamp
    # Key/value heads for grouped-query attention; must divide n_heads (= n_heads: plain multi-head).
    kv_n_heads: int = 1
    rope_theta: float = 10000.0  # RoPE base frequency (DBRX uses 500000)
    # When a batch carries `sequence_id` (packed fine-tuning rows always; pretraining rows with
    # train_loader.dataset.eos_token_id): attention stays within each document (block-diagonal causal),
    # RoPE positions restart at each document and no token is a target across a boundary. false: packed
    # documents attend to the earlier ones in their row (LLM Foundry's default).
    attn_uses_sequence_id: bool = True


@dataclass
class DbrxFFNConfig:
    # `{name: silu | gelu | relu}`: the activation of the experts' GLU gate, act(x W1) * (x V1).
    ffn_act_fn: dict = field(default_factory=lambda: {"name": "silu"})
    ffn_hidden_size: int = 3584  # hidden width of each expert's GLU (per expert)
    moe_num_experts: int = 4  # experts per MoE layer (every layer's FFN is an MoE)
    moe_top_k: int = 1  # experts each token is routed to, in [1, moe_num_experts]
    # Router input *= U(1 - eps, 1 + eps) while training; in [0, 1), 0 or null: no jitter (the published
    # dbrx-instruct config.json says 0).
    moe_jitter_eps: float | None = None
    # Weight of the load-balancing loss (mean over layers, 1 = balanced) added to the LM loss; 0: only logged.
    moe_loss_weight: float = 0.01
    # p of the p-norm the top-k routing weights are divided by (1: they sum to 1); null: raw softmax probs.
    moe_normalize_expert_weights: float | None = 1.0
    uniform_expert_assignment: bool = False  # round-robin expert choice, for benchmarking only
    # "torch" (any device) | "megablocks" (CUDA, bf16, the [gpu] extra) | "auto": megablocks on CUDA when
    # the [gpu] extra imports (torch's code for calls it cannot take, e.g. fp32), else torch.
    moe_backend: Literal["auto", "torch", "megablocks"] = "auto"
    # Tokens the balancing statistics (load-balancing loss, z-loss, bias updates, logged expert load) are
    # taken over. microbatch: each forward's own tokens (each rank, each microbatch; MegaBlocks' and
    # transformers' convention). global: the whole optimizer step's tokens, every microbatch on every rank
    # (per-expert counts all-reduced before the step's first forward, which costs one extra forward
    # without gradients when there is more than one microbatch or rank), so the loss does not depend on
    # the microbatch size or the world size.
    moe_loss_scope: Literal["microbatch", "global"] = "microbatch"
    # Weight of the router z-loss (ST-MoE: mean over tokens of logsumexp(router logits)^2), added to the
    # loss and logged as loss/train/router_z_loss; 0: off.
    moe_z_loss_weight: float = 0.0
    # Bias balancing without an auxiliary loss (DeepSeek-V3): a per-expert bias, added to the router
    # probabilities for the top-k choice only (never to the mixing weights), moves by this much after
    # every step, up for experts below the mean load of the step and down for those above it. In
    # probability units (a fair share is 1/moe_num_experts). 0: off (no bias). The bias is saved in
    # checkpoints; HF DBRX has no place for it (see docs/training.md, "Router balancing").
    moe_bias_update_rate: float = 0.0
    # Which tokens count in the balancing statistics. real: every token that is not padding (prompts
    # included: the experts compute on them, in training and in inference). targets: only tokens that are
    # trained on (labels != -100), e.g. the assistant turns of fine-tuning data.
    moe_balance_tokens: Literal["real", "targets"] = "real"


@dataclass
class DbrxConfig:
    d_model: int = 2048  # hidden size (residual stream width); must be divisible by n_heads
    n_heads: int = 16  # attention (query) heads; head_dim = d_model / n_heads must be even (RoPE)
    n_layers: int = 24  # transformer blocks (attention + MoE FFN each)
    # Longest sequence the model supports (RoPE table, KV cache size); >= the run's max_seq_len. Omitted in
    # the YAML: taken from the top-level max_seq_len when that is given.
    max_seq_len: int = 2048
    vocab_size: int = 32000  # rows of the embedding and LM head; token ids must be below it (DBRX: 100352)
    resid_pdrop: float = 0.0  # dropout on the attention and FFN outputs before each residual add, in [0, 1)
    emb_pdrop: float = 0.0  # dropout on the token embeddings, in [0, 1)
    attn_config: DbrxAttentionConfig = field(default_factory=DbrxAttentionConfig)
    ffn_config: DbrxFFNConfig = field(default_factory=DbrxFFNConfig)
    # Std of the normal init of linear, embedding, router and expert weights; the residual-stream outputs
    # (attention out_proj, expert w2) use initializer_range / sqrt(2 * n_layers).
    initializer_range: float = 0.02
    # Share one matrix between the embedding and the LM head (cannot be exported as an HF DBRX folder).
    tie_word_embeddings: bool = False
    # Also return each layer's router logits in the model output (the load-balancing loss is always added).
    output_router_logits: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DbrxConfig:
        """From plain nested dicts (an HF config.json, a YAML's model keys) through the one converter;
        raises ConfigError (a ValueError) listing every unknown key, wrong type and bad value."""
        from dbrx_train.config.schema import build  # plain Python, no Composer: the model stays free of it

        return build(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, JSON-serialisable; `from_dict(to_dict())` round-trips."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The keyword arguments `transformers.DbrxConfig(**d)` accepts (our extra FFN keys removed)."""
        d = self.to_dict()
        for key in NON_HF_ATTN_KEYS:
            del d["attn_config"][key]
        for key in NON_HF_FFN_KEYS:
            del d["ffn_config"][key]
        return d

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field (for configs built in code, not from YAML)."""
        found = self.problems()
        if found:
            raise ValueError("; ".join(f"{key} {message}" for key, message in found))

    def problems(self) -> list[tuple[str, str]]:
        """Every inconsistent value as (dotted field, what is wrong). The config converter
        (config/schema.py) calls this after building the dataclass from YAML."""
        attn, ffn = self.attn_config, self.ffn_config
        found: list[tuple[str, str]] = []
        positive = {
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "max_seq_len": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "attn_config.kv_n_heads": attn.kv_n_heads,
            "attn_config.rope_theta": attn.rope_theta,
            "ffn_config.ffn_hidden_size": ffn.ffn_hidden_size,
            "ffn_config.moe_num_experts": ffn.moe_num_experts,
            "initializer_range": self.initializer_range,
        }
        found += [(name, f"must be > 0; got {value!r}") for name, value in positive.items() if not value > 0]
        if self.n_heads > 0 and self.d_model % self.n_heads:
            found.append(("d_model", f"must be divisible by n_heads ({self.n_heads}); got {self.d_model}"))
        elif self.n_heads > 0 and self.head_dim % 2:
            found.append(
                (
                    "n_heads",
                    f"gives head_dim = d_model / n_heads = {self.head_dim}, which must be even for RoPE",
                )
            )
        if attn.kv_n_heads > 0 and self.n_heads % attn.kv_n_heads:
            found.append(
                ("attn_config.kv_n_heads", f"must divide n_heads ({self.n_heads}); got {attn.kv_n_heads}")
            )
        for name, p in {
            "resid_pdrop": self.resid_pdrop,
            "emb_pdrop": self.emb_pdrop,
            "attn_config.attn_pdrop": attn.attn_pdrop,
        }.items():
            if not 0.0 <= p < 1.0:
                found.append((name, f"must be in [0, 1); got {p!r}"))
        if attn.clip_qkv is not None and not attn.clip_qkv > 0:
            found.append(("attn_config.clip_qkv", f"must be > 0 or null; got {attn.clip_qkv!r}"))
        if not 1 <= ffn.moe_top_k <= ffn.moe_num_experts:
            found.append(
                (
                    "ffn_config.moe_top_k",
                    f"must be in [1, moe_num_experts={ffn.moe_num_experts}]; got {ffn.moe_top_k}",
                )
            )
        if ffn.moe_jitter_eps is not None and not 0.0 <= ffn.moe_jitter_eps < 1.0:
            found.append(
                (
                    "ffn_config.moe_jitter_eps",
                    f"must be in [0, 1) or null (0: no jitter); got {ffn.moe_jitter_eps!r}",
                )
            )
        if ffn.moe_normalize_expert_weights is not None and not ffn.moe_normalize_expert_weights > 0:
            found.append(
                (
                    "ffn_config.moe_normalize_expert_weights",
                    f"must be > 0 or null; got {ffn.moe_normalize_expert_weights!r}",
                )
            )
        if ffn.moe_loss_weight < 0:
            found.append(("ffn_config.moe_loss_weight", f"must be >= 0; got {ffn.moe_loss_weight!r}"))
        act = ffn.ffn_act_fn
        if not isinstance(act, dict) or set(act) != {"name"} or act["name"] not in SUPPORTED_ACTIVATIONS:
            found.append(
                (
                    "ffn_config.ffn_act_fn",
                    f"must be {{name: one of {list(SUPPORTED_ACTIVATIONS)}}}; got {act!r}",
                )
            )
        for key in ("moe_z_loss_weight", "moe_bias_update_rate"):
            if not getattr(ffn, key) >= 0:
                found.append((f"ffn_config.{key}", f"must be >= 0; got {getattr(ffn, key)!r}"))
        return found
