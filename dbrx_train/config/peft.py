"""``model.peft_config``: LoRA adapters, with LLM Foundry's keys (which are PEFT's LoraConfig's).

A YAML from Foundry's DBRX LoRA recipe (`peft_type: LORA`, `task_type: CAUSAL_LM`, `r`, `lora_alpha`,
`lora_dropout`, `target_modules`) is accepted as it is; its targets may also be the experts' weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbrx_train.config.schema import closest_key, did_you_mean
from dbrx_train.model.lora import EXPERT_TARGETS, LORA_TARGETS, LoraSpec


@dataclass
class PeftConfig:
    """``model.peft_config:`` train low-rank adapters on a frozen base (``model.pretrained``); null: full fine-tuning."""

    # Weights that get adapters: Wqkv and out_proj (attention, PEFT's LoRA), w1, v1, w2 (every expert
    # gets its own pair, updating only the tokens routed to it). Everything else stays frozen.
    target_modules: list[str]
    peft_type: str = "LORA"  # only LORA
    task_type: str = "CAUSAL_LM"  # accepted for LLM Foundry YAMLs; only CAUSAL_LM
    r: int = 8  # rank of each adapter pair B (out, r) A (r, in); > 0
    lora_alpha: float = 8.0  # the update B A is scaled by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input while training, in [0, 1)

    def __post_init__(self):
        if self.peft_type.upper() != "LORA":
            raise ValueError(f"peft_type must be LORA (the only method supported); got {self.peft_type!r}")
        if self.task_type.upper() != "CAUSAL_LM":
            raise ValueError(f"task_type must be CAUSAL_LM; got {self.task_type!r}")
        if self.r <= 0:
            raise ValueError(f"r must be a positive rank; got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0; got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError(
                "target_modules is empty: with a frozen base LoRA would train nothing; "
                f"list some of {', '.join(LORA_TARGETS)}"
            )
        for target in self.target_modules:
            if target not in LORA_TARGETS:
                raise ValueError(
                    f"target_modules: unknown target {target!r}{did_you_mean(closest_key(target, LORA_TARGETS))}; "
                    f"DBRX's LoRA targets are {', '.join(LORA_TARGETS)}"
                )
        self.target_modules = list(dict.fromkeys(self.target_modules))

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(tuple(self.target_modules), self.r, self.lora_alpha, self.lora_dropout)

    @property
    def expert_targets(self) -> list[str]:
        return [t for t in self.target_modules if t in EXPERT_TARGETS]
