"""LoRA adapters out: a merged HF DBRX folder, or a PEFT adapter folder.

- Merged: a plain DBRX folder (hf.save_hf_folder) whose target weights are W + (alpha / r) B A, computed
  in fp32 tensor by tensor from the base folder (`model.pretrained`) and the adapters, so no second
  copy of the model is ever held. transformers loads it as it loads the base.
- PEFT: `adapter_config.json` (peft.LoraConfig) + `adapter_model.safetensors` with PEFT's tensor names
  (`base_model.model.<module>.lora_A.weight`), which `peft.PeftModel.from_pretrained(<transformers
  DbrxForCausalLM of the base>, folder)` loads. PEFT adapts `nn.Linear`s only: transformers' DBRX keeps
  every layer's experts in one fused parameter, so expert adapters have no PEFT form (its
  `target_parameters` fails on DBRX's experts in peft 0.21) and are refused with a pointer to merged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.hf import DEFAULT_MAX_SHARD_BYTES, expected_shapes, save_hf_folder, weight_files
from dbrx_train.model.lora import ADAPTER_NAME, LoraSpec, merged_weight

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def peft_unsupported(spec: LoraSpec) -> str | None:
    """Why `spec`'s adapters cannot be written as a PEFT folder (None: they can)."""
    if not spec.expert_targets:
        return None
    return (
        f"a PEFT adapter folder cannot hold expert adapters ({', '.join(spec.expert_targets)}): transformers' "
        "DBRX fuses each layer's experts into one parameter, which PEFT's LoRA cannot adapt per expert; "
        "export the merged model instead (a plain DBRX folder with the adapters folded in)"
    )


def peft_key(name: str) -> str:
    """Our adapter tensor name -> the key PEFT stores it under."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")


def write_peft_folder(
    folder: str | Path,
    spec: LoraSpec,
    adapters: Mapping[str, torch.Tensor],
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """adapter_config.json + adapter_model.safetensors; `base_model` goes into base_model_name_or_path."""
    from peft import LoraConfig

    problem = peft_unsupported(spec)
    if problem is not None:
        raise ValueError(problem)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.attention_targets),
        base_model_name_or_path=base_model,
    ).save_pretrained(folder)
    tensors = {peft_key(name): t.detach().to("cpu", dtype).contiguous() for name, t in adapters.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def read_peft_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / ADAPTER_CONFIG_FILE).read_text())


def save_merged_folder(
    folder: str | Path,
    config: DbrxConfig,
    base_folder: str | Path,
    spec: LoraSpec,
    adapters: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> None:
    """A plain DBRX folder of the base with the adapters folded in, one tensor in memory at a time."""
    files = weight_files(base_folder)
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}

        def get_tensor(name: str) -> torch.Tensor:
            return merged_weight(name, handles[files[name]].get_tensor(name), adapters, spec.scaling)

        save_hf_folder(folder, config, expected_shapes(config), get_tensor, dtype, max_shard_bytes, tokenizer)
