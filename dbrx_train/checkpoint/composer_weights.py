"""Read model weights out of Composer checkpoints, one tensor at a time, without running their code.

Two layouts, as Composer writes them:
- FSDP sharded: a folder `ep0-baN/` of torch.distributed.checkpoint files (`.metadata`,
  `__<rank>_0.distcp`); model tensors are stored under `state.model.model.<HF name>` (Composer's
  State -> our ComposerModel's `.model` -> the parameter). Each tensor is read alone with
  `dcp.load(..., no_dist=True)` into a preallocated buffer (tensor blobs go through
  `torch.load(weights_only=True)`), so any world size converts on one process and the full model is
  never held twice. `.metadata` is a pickle: it is read with an unpickler that only accepts
  DCP's metadata classes, torch.Size, dtypes and paths.
- Unsharded: `ep0-baN/rank0.pt` (dbrx-train; Composer's own saver writes `ep0-baN-rank0.pt`), a torch.save of Composer's state (`state.model` holds the
  weights as `model.<HF name>`). Besides tensors it pickles Composer/numpy objects; we unpickle it
  with torch's tensor rebuilders and replace every other class by an inert placeholder, so no
  class from the file is imported or called.

The model config comes from the run folder's `config.yaml` (written by train.py next to the
checkpoints) unless a config path is given.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dbrx_train.checkpoint.safe_load import SafeFileSystemReader, stub_pickle_module
from dbrx_train.checkpoint.store import MANIFEST, Checkpoint, list_checkpoints, read_manifest, verify_files
from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.dbrx import DbrxForCausalLM
from dbrx_train.model.hf import CONFIG_FILE, expected_shapes, load_pretrained

DCP_MODEL_PREFIX = "state.model.model."
PT_MODEL_PREFIX = "model."


class CheckpointWeights(NamedTuple):
    shapes: dict[str, torch.Size]  # HF name -> shape
    get_tensor: Callable[[str], torch.Tensor]  # HF name -> tensor, read on demand


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _read_dcp(folder: Path) -> CheckpointWeights:
    reader = SafeFileSystemReader(str(folder))
    metadata = reader.read_metadata()
    specs = {
        key[len(DCP_MODEL_PREFIX) :]: meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(DCP_MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not specs:
        raise ValueError(f"{folder} holds no model tensors under '{DCP_MODEL_PREFIX}*'")

    def get_tensor(name: str) -> torch.Tensor:
        meta = specs[name]
        buffer = {DCP_MODEL_PREFIX + name: torch.empty(meta.size, dtype=meta.properties.dtype)}
        with warnings.catch_warnings():  # "torch.distributed is disabled...": one process is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(buffer, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
        return buffer[DCP_MODEL_PREFIX + name]

    return CheckpointWeights({name: meta.size for name, meta in specs.items()}, get_tensor)


def _read_pt(path: Path) -> CheckpointWeights:
    # torch.load delegates find_class to our unpickler; mmap keeps tensors on disk until copied.
    state = torch.load(
        path, map_location="cpu", weights_only=False, pickle_module=stub_pickle_module, mmap=True
    )
    model_state = state.get("state", {}).get("model") if isinstance(state, dict) else None
    if not isinstance(model_state, (dict, OrderedDict)):
        raise ValueError(f"{path} is not a Composer checkpoint (no state.model)")
    tensors = {
        key[len(PT_MODEL_PREFIX) :]: value
        for key, value in model_state.items()
        if key.startswith(PT_MODEL_PREFIX) and isinstance(value, torch.Tensor)
    }
    return CheckpointWeights({k: v.shape for k, v in tensors.items()}, tensors.__getitem__)


def newest_in_run_folder(path: Path) -> Path:
    """A run folder stands for its newest committed checkpoint; any other path for itself."""
    if path.is_dir() and not any((path / name).is_file() for name in (".metadata", "rank0.pt", CONFIG_FILE)):
        committed = list_checkpoints(path)
        if committed:
            return committed[-1].path
    return path


def verify_checkpoint(path: str | Path) -> str | None:
    """Check a checkpoint's files against its manifest (sizes and sha256) before reading them; raises
    CheckpointError naming the first bad file. Returns a warning when there is no manifest to check
    against (a checkpoint Composer wrote itself), None when it verified."""
    path = newest_in_run_folder(Path(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST).is_file():
        return f"{folder} has no {MANIFEST}: its files are read without checksum verification"
    verify_files(Checkpoint(folder, read_manifest(folder)))
    return None


def read_composer_checkpoint(path: str | Path) -> CheckpointWeights:
    path = newest_in_run_folder(Path(path))
    if path.is_dir():
        if (path / "rank0.pt").is_file() and not (path / ".metadata").is_file():
            return _read_pt(path / "rank0.pt")  # an unsharded dbrx-train checkpoint folder
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} is not a sharded Composer checkpoint: it has no .metadata file")
        return _read_dcp(path)
    if path.is_file():
        return _read_pt(path)
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def run_config_path(checkpoint: str | Path) -> Path:
    """The run folder's config.yaml: next to the checkpoint folder or .pt, above `ep0-baN/rank0.pt`, or in
    the run folder itself."""
    path = Path(checkpoint).resolve()
    candidates = [path.parent / "config.yaml", path.parent.parent / "config.yaml", path / "config.yaml"]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_model_config(config_yaml: str | Path) -> DbrxConfig:
    from dbrx_train.config.run import load_model_config

    return load_model_config(config_yaml)


def load_model(path: str | Path, config_yaml: str | Path | None = None) -> DbrxForCausalLM:
    """An fp32 DbrxForCausalLM from an HF folder or a Composer checkpoint (any world size; see
    `verify_checkpoint` to check it against its manifest first)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return load_pretrained(path)
    config_yaml = Path(config_yaml) if config_yaml else run_config_path(path)
    if not config_yaml.is_file():
        raise FileNotFoundError(f"no model config for {path}: {config_yaml} does not exist (pass --config)")
    config = read_model_config(config_yaml)
    weights = read_composer_checkpoint(path)
    check_shapes(weights, config, path)
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    model.to_empty(device="cpu")
    model.transformer.rotary.init_weights()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(weights.get_tensor(name))
    return model


def check_shapes(weights: CheckpointWeights, config: DbrxConfig, path: str | Path) -> None:
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in weights.shapes:
            raise ValueError(f"{path} has no tensor '{name}'")
        if tuple(weights.shapes[name]) != tuple(shape):
            raise ValueError(
                f"{path}: '{name}' has shape {tuple(weights.shapes[name])}, config says {tuple(shape)}"
            )
