"""DBRX model configuration.

Field names and defaults equal `transformers.DbrxConfig` (and its `attn_config` / `ffn_config`
sub-configs) so an HF `config.json` maps onto these dataclasses key for key. Two fields are ours and
are dropped by `to_hf_dict()`: `ffn_config.uniform_expert_assignment` (LLM Foundry / MegaBlocks
benchmarking switch) and `ffn_config.moe_backend` (which MoE implementation runs the experts).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "relu")
MOE_BACKENDS = ("auto", "torch", "megablocks")
# Keys that transformers' DbrxFFNConfig would reject as unknown.
NON_HF_FFN_KEYS = ("uniform_expert_assignment", "moe_backend")


@dataclass
class DbrxAttentionConfig:
    attn_pdrop: float = 0.0  # dropout probability on the attention weights, in [0, 1); training only
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] after Wqkv; null: no clamp
    # Key/value heads for grouped-query attention; must divide n_heads (= n_heads: plain multi-head).
    kv_n_heads: int = 1
    rope_theta: float = 10000.0  # RoPE base frequency (DBRX uses 500000)


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
    moe_backend: str = "auto"


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

    def __post_init__(self) -> None:
        # Accept the nested sections as dicts too, as transformers' DbrxConfig does.
        if isinstance(self.attn_config, dict):
            self.attn_config = _from_dict(DbrxAttentionConfig, self.attn_config, "attn_config.")
        if isinstance(self.ffn_config, dict):
            self.ffn_config = _from_dict(DbrxFFNConfig, self.ffn_config, "ffn_config.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DbrxConfig:
        """Build and validate a config from (nested) plain dicts; unknown keys raise ValueError."""
        config = _from_dict(cls, d, "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, JSON-serialisable; `from_dict(to_dict())` round-trips."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The keyword arguments `transformers.DbrxConfig(**d)` accepts (our extra FFN keys removed)."""
        d = self.to_dict()
        for key in NON_HF_FFN_KEYS:
            del d["ffn_config"][key]
        return d

    def validate(self) -> None:
        """Raise ValueError naming the offending field on the first inconsistency found."""
        attn, ffn = self.attn_config, self.ffn_config
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
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % attn.kv_n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by attn_config.kv_n_heads ({attn.kv_n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        for name, p in {
            "resid_pdrop": self.resid_pdrop,
            "emb_pdrop": self.emb_pdrop,
            "attn_config.attn_pdrop": attn.attn_pdrop,
        }.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if attn.clip_qkv is not None and not attn.clip_qkv > 0:
            raise ValueError(f"attn_config.clip_qkv must be > 0 or null, got {attn.clip_qkv!r}")
        if not 1 <= ffn.moe_top_k <= ffn.moe_num_experts:
            raise ValueError(
                f"ffn_config.moe_top_k ({ffn.moe_top_k}) must be in [1, moe_num_experts={ffn.moe_num_experts}]"
            )
        if ffn.moe_jitter_eps is not None and not 0.0 <= ffn.moe_jitter_eps < 1.0:
            raise ValueError(
                f"ffn_config.moe_jitter_eps must be in [0, 1) or null, got {ffn.moe_jitter_eps!r}"
            )
        if ffn.moe_normalize_expert_weights is not None and not ffn.moe_normalize_expert_weights > 0:
            raise ValueError(
                "ffn_config.moe_normalize_expert_weights must be > 0 or null, "
                f"got {ffn.moe_normalize_expert_weights!r}"
            )
        if ffn.moe_loss_weight < 0:
            raise ValueError(f"ffn_config.moe_loss_weight must be >= 0, got {ffn.moe_loss_weight!r}")
        act = ffn.ffn_act_fn
        if not isinstance(act, dict) or set(act) != {"name"} or act["name"] not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"ffn_config.ffn_act_fn must be {{'name': one of {list(SUPPORTED_ACTIVATIONS)}}}, got {act!r}"
            )
        if ffn.moe_backend not in MOE_BACKENDS:
            raise ValueError(
                f"ffn_config.moe_backend must be one of {list(MOE_BACKENDS)}, got {ffn.moe_backend!r}"
            )


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = dict(d)
    for key, sub_cls in (("attn_config", DbrxAttentionConfig), ("ffn_config", DbrxFFNConfig)):
        if cls is DbrxConfig and key in kwargs:
            kwargs[key] = _from_dict(sub_cls, kwargs[key], f"{key}.")
    return cls(**kwargs)
