"""LoRA for DBRX: low-rank adapters on attention (`Wqkv`, `out_proj`) and on every expert (`w1`, `v1`, `w2`).

The adapted weight is W + (lora_alpha / r) * B A, with A (r, in) and B (out, r); B starts at zero, so an
adapted model starts equal to its base. The base is frozen; only the adapters train.

- Attention targets are `nn.Linear`s: PEFT's own `lora.Linear` wraps each one (so its initialisation,
  dropout and scaling are PEFT's, and its tensors export as a PEFT adapter folder). The base weight
  moves to `<target>.base_layer.weight`; `hf_name` maps it back to the HF name.
- Expert targets are slices of one fused (E*F, D) weight, which PEFT cannot adapt per expert: one pair
  over the fused weight would tie the experts together. `ExpertLoRA` holds one pair per expert,
  lora_A (E, r, in) and lora_B (E, out, r), and adds expert e's update only to the rows routed to e.
  w1 and v1 map D -> F (in = D, out = F); w2 maps F -> D and is stored (F, D), so its update in the
  stored layout is (B_e A_e)^T.

Names: `...attn.Wqkv.lora_A.default.weight` (PEFT's), `...ffn.experts.lora.w1.lora_A`. Every adapter
tensor's name contains `lora_A` or `lora_B`; `is_adapter` says so.

Shapes as in moe.py: N tokens, D d_model, E experts, F ffn_hidden_size, M = N*k assignments, r rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.dbrx import DbrxForCausalLM
from dbrx_train.model.moe import Routing, combine, gather, sort_by_expert

ATTENTION_TARGETS = ("Wqkv", "out_proj")
EXPERT_TARGETS = ("w1", "v1", "w2")
LORA_TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS
ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter


class LoraSpec(NamedTuple):
    """What to adapt and how (the model side of `model.peft_config`)."""

    targets: tuple[str, ...]  # a subset of LORA_TARGETS
    r: int
    alpha: float
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def attention_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in ATTENTION_TARGETS)

    @property
    def expert_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in EXPERT_TARGETS)


def is_adapter(name: str) -> bool:
    """A tensor name of an adapter (every other tensor of an adapted model is the frozen base)."""
    return ".lora_A" in name or ".lora_B" in name


def hf_name(name: str) -> str:
    """The HF DBRX name of a base tensor of an adapted model (PEFT moves Linear weights to base_layer)."""
    return name.replace(".base_layer.", ".")


# ---------------------------------------------------------------------------------------------
# Expert adapters
# ---------------------------------------------------------------------------------------------
def per_expert_mm(x_MI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """Row block e of x times w_e^T: (M, in) -> (M, out), one matmul per expert with rows."""
    pieces = [x_e @ w_e.t() for x_e, w_e in zip(x_MI.split(tokens_per_expert), w_EOI.unbind(0), strict=True)]
    return torch.cat(pieces)


class ExpertLoRA(nn.Module):
    """One low-rank pair per expert for one fused expert weight: expert e's rows get (x A_e^T) B_e^T * scale."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, spec: LoraSpec, device=None):
        super().__init__()
        self.scaling, self.dropout = spec.scaling, spec.dropout
        self.lora_A = nn.Parameter(torch.empty(num_experts, spec.r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, spec.r, device=device))
        if not self.lora_A.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default for each expert's pair: A kaiming-uniform over its fan-in, B zero."""
        for a_RI in self.lora_A.unbind(0):
            nn.init.kaiming_uniform_(a_RI, a=math.sqrt(5))
        self.lora_B.zero_()

    def forward(self, x_MI: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """The update of every row (M, in) -> (M, out); rows are grouped by expert as `gather` leaves them."""
        x_MI = F.dropout(x_MI, p=self.dropout, training=self.training)
        low_MR = per_expert_mm(x_MI, self.lora_A.to(x_MI.dtype), tokens_per_expert)
        return per_expert_mm(low_MR, self.lora_B.to(x_MI.dtype), tokens_per_expert) * self.scaling

    def delta(self) -> torch.Tensor:
        """(E, out, in): each expert's weight update, B_e A_e * scale."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling


class LoraExperts(nn.Module):
    """The experts of one MoE layer with per-expert adapters on some of w1, v1, w2.

    Runs the torch backend's steps (sort -> gather -> GLU per expert -> combine) under autograd; the
    frozen base weights get no gradient. Each adapter is one module call over all rows, so FSDP can
    shard the adapters as units of their own. Any backend's experts can be adapted: the base weights
    are the same `ExpertGLU` (`mlp`), so parameter names do not change.
    """

    def __init__(self, experts: nn.Module, spec: LoraSpec):
        super().__init__()
        self.mlp = experts.mlp
        E, F_, D = self.mlp.num_experts, self.mlp.ffn_hidden_size, self.mlp.d_model
        shapes = {"w1": (D, F_), "v1": (D, F_), "w2": (F_, D)}  # (in, out) of each linear map
        device = self.mlp.w1.device
        self.lora = nn.ModuleDict(
            {t: ExpertLoRA(E, *shapes[t], spec, device=device) for t in spec.expert_targets}
        )

    def update(self, target: str, x_MI: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor | float:
        return self.lora[target](x_MI, tokens_per_expert) if target in self.lora else 0.0

    def forward(self, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        mlp = self.mlp
        top_k = routing.experts_Nk.shape[-1]
        bins = sort_by_expert(routing.experts_Nk, mlp.num_experts)
        tokens_per_expert = bins.tokens_per_expert_E.tolist()  # the layer's one host sync
        x_MD = gather(x_ND, bins.order_M, top_k)
        w1, v1, w2 = (mlp.per_expert(w) for w in (mlp.w1, mlp.v1, mlp.w2))  # (E, F, D) each
        h1_MF = per_expert_mm(x_MD, w1, tokens_per_expert) + self.update("w1", x_MD, tokens_per_expert)
        h2_MF = per_expert_mm(x_MD, v1, tokens_per_expert) + self.update("v1", x_MD, tokens_per_expert)
        glu_MF = mlp.act(h1_MF) * h2_MF
        # w2_e is used as (F, D) without transpose: the same map as per_expert_mm with w2_e^T.
        y_MD = per_expert_mm(glu_MF, w2.transpose(1, 2), tokens_per_expert)
        y_MD = y_MD + self.update("w2", glu_MF, tokens_per_expert)
        return combine(y_MD, bins, routing.weights_Nk, x_ND.shape[0])


# ---------------------------------------------------------------------------------------------
# Applying adapters
# ---------------------------------------------------------------------------------------------
def apply_lora(model: DbrxForCausalLM, spec: LoraSpec) -> None:
    """Freeze `model` and add adapters for `spec` in place (on the parameters' device, meta included)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    model.requires_grad_(False)
    peft_config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.attention_targets),
    )
    for block in model.transformer.blocks:
        attn = block.norm_attn_norm.attn
        for target in spec.attention_targets:
            adapted = PeftLinear(
                getattr(attn, target), ADAPTER_NAME, config=peft_config, r=spec.r, lora_alpha=spec.alpha
            )
            setattr(attn, target, adapted)
        if spec.expert_targets:
            block.ffn.experts = LoraExperts(block.ffn.experts, spec)


def adapter_modules(module: nn.Module) -> list[nn.Module]:
    """The modules under `module` that hold adapter parameters directly and run a forward of their own
    (PEFT's lora_A/lora_B Linears, ExpertLoRA): the units FSDP shards the adapters by."""
    return [
        m
        for name, m in module.named_modules()
        if isinstance(m, ExpertLoRA) or (isinstance(m, nn.Linear) and is_adapter(f".{name}"))
    ]


def adapter_param_init(model: DbrxForCausalLM) -> Callable[[nn.Module], None]:
    """A `param_init_fn` for a model built on meta with adapters: PEFT's initialisation for the
    adapters (B zero, so the model starts equal to its base), the model's own for everything else."""
    lora_A = {id(m) for name, m in model.named_modules() if name.endswith(f"lora_A.{ADAPTER_NAME}")}
    lora_B = {id(m) for name, m in model.named_modules() if name.endswith(f"lora_B.{ADAPTER_NAME}")}

    @torch.no_grad()
    def init(module: nn.Module) -> None:
        if isinstance(module, ExpertLoRA):
            module.reset_parameters()
        elif id(module) in lora_A:
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif id(module) in lora_B:
            module.weight.zero_()
        else:
            model.init_module(module)

    return init


# ---------------------------------------------------------------------------------------------
# Shapes, counts and merging (from tensors alone: checkpoints and exports need no model)
# ---------------------------------------------------------------------------------------------
def adapter_shapes(config: DbrxConfig, spec: LoraSpec) -> dict[str, torch.Size]:
    """Every adapter tensor's name (as in the model) -> shape."""
    D, F_, E, r = config.d_model, config.ffn_config.ffn_hidden_size, config.ffn_config.moe_num_experts, spec.r
    qkv_out = D + 2 * config.attn_config.kv_n_heads * config.head_dim
    linear = {"Wqkv": (D, qkv_out), "out_proj": (D, D)}  # (in, out)
    expert = {"w1": (D, F_), "v1": (D, F_), "w2": (F_, D)}
    shapes: dict[str, torch.Size] = {}
    for i in range(config.n_layers):
        block = f"transformer.blocks.{i}"
        for t in spec.attention_targets:
            fan_in, fan_out = linear[t]
            prefix = f"{block}.norm_attn_norm.attn.{t}"
            shapes[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"] = torch.Size((r, fan_in))
            shapes[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"] = torch.Size((fan_out, r))
        for t in spec.expert_targets:
            fan_in, fan_out = expert[t]
            prefix = f"{block}.ffn.experts.lora.{t}"
            shapes[f"{prefix}.lora_A"] = torch.Size((E, r, fan_in))
            shapes[f"{prefix}.lora_B"] = torch.Size((E, fan_out, r))
    return shapes


def count_adapter_params(config: DbrxConfig, spec: LoraSpec) -> int:
    return sum(shape.numel() for shape in adapter_shapes(config, spec).values())


def adapter_pair(hf_weight: str) -> tuple[str, str] | None:
    """(lora_A, lora_B) tensor names that adapt the HF weight `hf_weight`, if it is a LoRA target."""
    parts = hf_weight.rsplit(".", 2)
    if hf_weight.endswith(".weight") and len(parts) == 3 and parts[1] in ATTENTION_TARGETS:
        prefix = hf_weight.removesuffix(".weight")
        return f"{prefix}.lora_A.{ADAPTER_NAME}.weight", f"{prefix}.lora_B.{ADAPTER_NAME}.weight"
    if ".ffn.experts.mlp." in hf_weight and parts[-1] in EXPERT_TARGETS:
        prefix = hf_weight.replace(".ffn.experts.mlp.", ".ffn.experts.lora.")
        return f"{prefix}.lora_A", f"{prefix}.lora_B"
    return None


def weight_delta(hf_weight: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update of one HF weight in its stored layout, in fp32."""
    a, b = lora_A.float(), lora_B.float()
    if a.dim() == 2:  # a Linear: (out, in)
        return (b @ a) * scaling
    delta_EOI = torch.bmm(b, a) * scaling  # expert e's map in -> out
    if hf_weight.endswith(".w2"):  # stored (F, D) = in x out
        delta_EOI = delta_EOI.transpose(1, 2)
    return delta_EOI.reshape(-1, delta_EOI.shape[-1])


def merged_weight(
    hf_weight: str, base: torch.Tensor, adapters: Mapping[str, torch.Tensor], scaling: float
) -> torch.Tensor:
    """W + scaling * B A for a target weight (computed in fp32, returned in fp32); other weights as they are."""
    pair = adapter_pair(hf_weight)
    if pair is None or pair[0] not in adapters:
        return base
    return base.float() + weight_delta(hf_weight, adapters[pair[0]], adapters[pair[1]], scaling)
