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

import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dbrx_train.model.config import DbrxConfig
from dbrx_train.model.dbrx import DbrxForCausalLM
from dbrx_train.model.hf import CONFIG_FILE, expected_shapes

DCP_MODEL_PREFIX = "state.model.model."
PT_MODEL_PREFIX = "model."


class CheckpointWeights(NamedTuple):
    shapes: dict[str, torch.Size]  # HF name -> shape
    get_tensor: Callable[[str], torch.Tensor]  # HF name -> tensor, read on demand


# ---------------------------------------------------------------------------------------------
# Restricted unpicklers
# ---------------------------------------------------------------------------------------------
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_SAFE = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE or (module, name) in _DCP_SAFE or _is_dtype(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


class _SafeFileSystemReader(FileSystemReader):
    def read_metadata(self) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = DcpMetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Opaque:
    """Stands in for any non-tensor class in a .pt checkpoint: accepts and ignores everything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (SETITEMS)
        pass

    def append(self, value: Any) -> None:  # list subclasses (APPENDS)
        pass

    def extend(self, values: Any) -> None:
        pass


_PT_SAFE = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
}


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PT_SAFE or _is_dtype(module, name):
            return super().find_class(module, name)
        return _Opaque


class _stub_pickle_module:  # noqa: N801 (stands in for the `pickle` module in torch.load)
    Unpickler = _StubUnpickler
    load = staticmethod(lambda f, **kw: _StubUnpickler(f, **kw).load())
    __name__ = "dbrx_train_stub_pickle"


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _read_dcp(folder: Path) -> CheckpointWeights:
    reader = _SafeFileSystemReader(str(folder))
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
            dcp.load(buffer, storage_reader=_SafeFileSystemReader(str(folder)), no_dist=True)
        return buffer[DCP_MODEL_PREFIX + name]

    return CheckpointWeights({name: meta.size for name, meta in specs.items()}, get_tensor)


def _read_pt(path: Path) -> CheckpointWeights:
    # torch.load delegates find_class to our unpickler; mmap keeps tensors on disk until copied.
    state = torch.load(
        path, map_location="cpu", weights_only=False, pickle_module=_stub_pickle_module, mmap=True
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
    from dbrx_train.checkpoint_store import list_checkpoints

    if path.is_dir() and not any((path / name).is_file() for name in (".metadata", "rank0.pt", CONFIG_FILE)):
        committed = list_checkpoints(path)
        if committed:
            return committed[-1].path
    return path


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
    from dbrx_train.config import load_model_config

    return load_model_config(config_yaml)


def load_model(path: str | Path, config_yaml: str | Path | None = None) -> DbrxForCausalLM:
    """An fp32 DbrxForCausalLM from an HF folder or a Composer checkpoint (any world size)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return DbrxForCausalLM.from_pretrained(path)
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
