"""Checkpoints of LoRA runs: they hold the adapters and their optimizer state, not the frozen base.

The base is read from `model.pretrained` again on every start, so a resume must find the same base
there: each checkpoint's manifest records the base's fingerprint (`base_model`), and a resume whose
folder holds other weights is refused, naming `model.pretrained`. Adapters are checked against the
shapes the run expects before anything loads them, naming the first tensor that differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from dbrx_train.checkpoint.composer_weights import newest_in_run_folder, read_composer_checkpoint
from dbrx_train.config.run import RunModel
from dbrx_train.config.schema import ConfigError
from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.dbrx import DbrxForCausalLM
from dbrx_train.model.hf import check_hf_folder, load_hf_weights, weight_files
from dbrx_train.model.lora import LoraSpec, adapter_shapes, apply_lora, is_adapter, merged_weight

if TYPE_CHECKING:  # start.py imports Composer, which converting and sampling need not load
    from dbrx_train.checkpoint.start import Start

SAMPLE_ELEMENTS = 4096  # of each tensor, from its start, hashed into the fingerprint


def base_fingerprint(folder: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and first SAMPLE_ELEMENTS values: different weights
    (another model, another fine-tune of the same one) differ there; cheap even for 132B (no full read)."""
    digest = hashlib.sha256()
    files = weight_files(folder)
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for name in sorted(f.keys()):  # noqa: SIM118 (safe_open has no __iter__)
                piece = f.get_slice(name)
                shape = piece.get_shape()
                digest.update(json.dumps([name, piece.get_dtype(), shape]).encode())
                rows = max(1, SAMPLE_ELEMENTS // max(1, int(torch.Size(shape[1:]).numel()))) if shape else 0
                sample = piece[:rows] if shape else f.get_tensor(name)
                digest.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_record(folder: str | Path) -> dict[str, Any]:
    """What a LoRA checkpoint's manifest says about its base."""
    return {"folder": str(folder), "fingerprint": base_fingerprint(folder)}


def check_resume_base(start: Start, current: dict[str, Any] | None) -> None:
    """Refuse resuming a LoRA checkpoint on another base than the one it was trained on (`current`:
    base_record of model.pretrained; None: not a LoRA run)."""
    if current is None or not start.resumed or start.checkpoint is None:
        return
    saved = start.checkpoint.manifest.get("base_model")
    if saved is None or saved.get("fingerprint") == current["fingerprint"]:
        return
    checkpoint_name = start.checkpoint.name
    raise ConfigError(
        f"resuming from {checkpoint_name}: model.pretrained {current['folder']} holds other weights than the base "
        f"its adapters were trained on ({saved.get('folder')}; fingerprint {str(saved.get('fingerprint'))[:12]} "
        f"vs {current['fingerprint'][:12]}). Point model.pretrained at that base to continue the run, or start a "
        "new run (another save_folder)"
    )


def adapter_mismatch(found: dict[str, torch.Size], expected: dict[str, torch.Size]) -> str | None:
    """The first adapter tensor whose name or shape differs between a checkpoint and the run (None: all agree)."""
    for name, shape in expected.items():
        if name not in found:
            return f"has no adapter '{name}'"
        if tuple(found[name]) != tuple(shape):
            return (
                f"has adapter '{name}' of shape {tuple(found[name])}, but model.peft_config on this base "
                f"gives {tuple(shape)}"
            )
    extra = [name for name in found if name not in expected]
    if extra:
        return f"has adapter '{extra[0]}', which model.peft_config does not make"
    return None


def checkpoint_adapter_shapes(path: str | Path) -> tuple[dict[str, torch.Size], bool]:
    """(adapter name -> shape, whether the checkpoint also holds base weights) of a Composer checkpoint,
    a checkpoint folder or a run folder (its newest), from its metadata."""
    shapes = read_composer_checkpoint(newest_in_run_folder(Path(path))).shapes
    adapters = {name: shape for name, shape in shapes.items() if is_adapter(name)}
    return adapters, len(adapters) < len(shapes)


def load_adapters(path: str | Path, config: DbrxConfig, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA checkpoint (any world size), checked against `config` and `spec`."""
    weights = read_composer_checkpoint(path)
    found = {name: shape for name, shape in weights.shapes.items() if is_adapter(name)}
    if not found:
        raise ValueError(f"{path} holds no LoRA adapters")
    problem = adapter_mismatch(found, adapter_shapes(config, spec))
    if problem is not None:
        raise ValueError(f"{path} {problem}")
    return {name: weights.get_tensor(name) for name in found}


def load_adapted_model(
    path: str | Path, run: RunModel, base: str | None = None, merge: bool = False
) -> DbrxForCausalLM:
    """An fp32 model from a LoRA checkpoint and its base (`base`, else the run's model.pretrained):
    with the adapters folded into the weights (`merge`), or as adapter modules applied on the fly."""
    base = base or run.pretrained
    if run.peft is None or base is None:
        raise ValueError(
            f"{path} is not a checkpoint of a LoRA run (no model.peft_config and model.pretrained)"
        )
    spec = run.peft.spec
    check_hf_folder(
        base, run.dbrx
    )  # the base must have the run's shapes: names the first tensor that differs
    adapters = load_adapters(path, run.dbrx, spec)
    with torch.device("meta"):
        model = DbrxForCausalLM(run.dbrx)
    model.to_empty(device="cpu")
    model.transformer.rotary.init_weights()
    load_hf_weights(model, base)
    with torch.no_grad():
        if merge:
            for name, param in model.state_dict().items():
                param.copy_(merged_weight(name, param, adapters, spec.scaling))
        else:
            apply_lora(model, spec)
            state = model.state_dict()
            for name, tensor in adapters.items():
                state[name].copy_(tensor)
    return model.eval()
