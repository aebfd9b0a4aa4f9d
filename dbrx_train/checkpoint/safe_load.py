"""Loading never runs code from a checkpoint file.

Before Composer reads a checkpoint, every pickle in it is read here with restricted unpicklers
(`.metadata` with DCP's metadata classes only; every other pickled entry with
`torch.load(weights_only=True)` and a short list of harmless types), and a checkpoint that needs
anything else is refused, naming the entry (`check_no_code`). Composer's own load then runs under
`restricted_loading`, with the same restrictions. Reading weights out of a checkpoint on one
process (composer_weights.py) uses the same unpicklers: `.pt` files go through `_StubUnpickler`,
which turns every non-tensor class into an inert placeholder.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import pickle
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from dbrx_train import compat
from dbrx_train.checkpoint.store import CheckpointError


def allowed_globals() -> list[Any]:
    """The only non-tensor types Composer's state needs (timestamps' wall-clock times, the torch
    version, numpy's RNG state). torch.load(weights_only=True) accepts these and refuses the rest."""
    compat.check("numpy_reconstruct")
    return [
        datetime.timedelta,
        torch.torch_version.TorchVersion,
        np.ndarray,
        np.dtype,
        np._core.multiarray._reconstruct,
        type(np.dtype(np.uint32)),
        type(np.dtype(np.int64)),
        type(np.dtype(np.float64)),
    ]


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


def dcp_data_files(folder: Path) -> set[str]:
    """The data files a sharded checkpoint's .metadata refers to (one per rank that wrote one)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = DcpMetadataUnpickler(f).load()
    return {info.relative_path for info in metadata.storage_data.values()}


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self) -> Metadata:
        compat.check("dcp_read_metadata")
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


class stub_pickle_module:  # noqa: N801 (stands in for the `pickle` module in torch.load)
    Unpickler = _StubUnpickler
    load = staticmethod(lambda f, **kw: _StubUnpickler(f, **kw).load())
    __name__ = "dbrx_train_stub_pickle"


def _load_restricted(blob: bytes | io.BufferedIOBase, where: str) -> None:
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            torch.load(blob if not isinstance(blob, bytes) else io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0])
        raise CheckpointError(
            f"{where} would run code from the file when loaded; refusing it ({detail.strip()})"
        ) from None
    except Exception as e:  # noqa: BLE001 (a damaged blob is a damaged checkpoint, whatever torch says)
        raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


@contextlib.contextmanager
def restricted_loading() -> Iterator[None]:
    """While Composer loads a checkpoint, nothing in it can run code, even if the files changed after
    check_no_code: every torch.load is weights_only with `allowed_globals()` (DCP's byte entries and Composer's
    .pt are read with weights_only=False otherwise), and DCP's `.metadata` goes through the restricted
    unpickler instead of pickle.load."""
    from torch.distributed.checkpoint import filesystem

    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed_globals()):
            return real_load(*args, **kwargs)

    restricted_pickle = types.SimpleNamespace(**vars(pickle))
    restricted_pickle.load = lambda f, **kwargs: DcpMetadataUnpickler(f).load()
    with (
        compat.swapped("dcp_restricted_pickle", torch, load=load),
        compat.swapped("dcp_restricted_pickle", filesystem, pickle=restricted_pickle),
    ):
        yield


def check_no_code(load_path: Path) -> None:
    """Refuse a checkpoint whose pickles reference anything beyond tensors and plain data."""
    if load_path.is_file():
        _load_restricted(open(load_path, "rb"), str(load_path))  # noqa: SIM115 (torch.load reads it)
        return
    metadata_path = load_path / ".metadata"
    try:
        with open(metadata_path, "rb") as f:
            metadata = DcpMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{load_path} is not a sharded checkpoint: it has no .metadata") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{metadata_path} would run code from the file when loaded; refusing it ({e})"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{metadata_path} cannot be read ({type(e).__name__}: {e})") from None
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, BytesStorageMetadata):
            continue  # tensors: DCP itself reads them with torch.load(weights_only=True)
        info = metadata.storage_data[MetadataIndex(key)]
        path = load_path / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        if len(blob) != info.length:
            raise CheckpointError(f"{path} is truncated (entry '{key}' runs past its end)")
        _load_restricted(blob, f"{path} entry '{key}'")
