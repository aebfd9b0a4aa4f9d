"""`model.pretrained` with `init_device: meta`: each rank reads only its own FSDP shard of each tensor.

Every rank builds the model on `meta`. Composer's FSDP2 path (`Trainer(parallelism_config=...)`)
shards it, still on meta, then walks it (`meta_init`): each module that holds meta tensors is
allocated on the device (`to_empty`: only this rank's rows) and handed to the model's
`param_init_fn`. For this run that function is a `ShardLoader`: for each of the module's
parameters it works out which rows of the full tensor this rank holds and reads just those from
the safetensors (`model.hf.read_hf_rows`); the RoPE tables, which no checkpoint holds, are
computed. Nothing is randomly initialised, and a rank holds its shard plus one read chunk.

FSDP2 shards dim 0 as `torch.chunk` does: pieces of ceil(rows / ranks) rows, so the last ranks'
pieces are shorter or empty (FSDP pads them in its own buffers, not in the parameter we fill).
HSDP's 2-D mesh replicates over one dimension and shards over the other.

Composer 0.32.1's walk allocates on 'cuda' only; `route_meta_init_to_shard_loaders` runs the same
walk on the loader's device, so this works on CPU (gloo) and GPU alike.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from composer.utils import dist
from torch import nn
from torch.distributed.tensor import DTensor, Placement

from dbrx_train import compat
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.dbrx import RotaryEmbedding
from dbrx_train.model.hf import read_hf_rows, weight_files

log = logging.getLogger("dbrx_train")

MB = 1e6


def shard_rows(
    rows: int, placements: Sequence[Placement], mesh_sizes: Sequence[int], coordinate: Sequence[int]
) -> tuple[int, int]:
    """Rows [start, stop) of a `rows`-row tensor held by the rank at `coordinate` of a device mesh
    with these sizes. Each Shard(0) mesh dimension splits the rows it receives as torch.chunk does
    (pieces of ceil(n / size) rows; the last pieces may be shorter or empty); Replicate keeps them."""
    start, stop = 0, rows
    for placement, size, index in zip(placements, mesh_sizes, coordinate, strict=True):
        if placement.is_replicate():
            continue
        if not placement.is_shard(0):
            raise ValueError(f"a parameter placed {tuple(placements)}: only dim-0 shards can be read by rows")
        chunk = -(-(stop - start) // size)
        start = min(start + index * chunk, stop)
        stop = min(start + chunk, stop)
    return start, stop


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) of the full tensor that this rank's shard of `param` holds."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    mesh = param.device_mesh
    start, stop = shard_rows(param.shape[0], param.placements, mesh.shape, mesh.get_coordinate())
    if param.to_local().shape[0] != stop - start:
        raise RuntimeError(
            f"this rank's shard has {param.to_local().shape[0]} rows, but rows [{start}, {stop}) were "
            f"expected for placements {param.placements} (FSDP2 no longer shards like torch.chunk?)"
        )
    return start, stop


class ShardLoader:
    """The model's `param_init_fn` for Composer's meta init: fills one module's own tensors."""

    def __init__(self, model: DbrxForCausalLM, folder: str | Path, device: str):
        self.folder = folder
        self.device = device  # "cpu" or "cuda": where the shards are allocated
        self.files = weight_files(folder)
        # Built before Composer wraps anything: activation checkpointing inserts modules into the
        # names, but every module we fill keeps its identity.
        self.names = {module: name for name, module in model.named_modules()}
        self.pending = set(self.files)
        self.bytes_read = 0
        self.started: float | None = None
        self.rss_before: int | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        if self.started is None:
            self.started = time.monotonic()
            self.rss_before = _reset_peak_rss()
        prefix = self.names.get(module)
        if prefix is None:
            raise RuntimeError(
                f"a {type(module).__name__} was added to the model after its loader was set up"
            )
        if isinstance(module, RotaryEmbedding):
            module.init_weights()  # derived from the config, in no checkpoint
        elif next(module.buffers(recurse=False), None) is not None:
            raise RuntimeError(f"module '{prefix}' has buffers that an HF folder does not hold")
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{param_name}" if prefix else param_name
            if name not in self.files:
                raise RuntimeError(f"model.pretrained: parameter '{name}' is not in {self.folder}")
            start, stop = local_rows(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            self.bytes_read += read_hf_rows(self.files, name, start, stop, local)
            self.pending.discard(name)
        if not self.pending:
            self._log_done()

    def check_done(self) -> None:
        """After the Trainer has sharded the model: every tensor of the folder was read."""
        if self.pending:
            missing = sorted(self.pending)
            raise RuntimeError(
                f"model.pretrained: {len(missing)} tensor(s) of {self.folder} were never loaded, e.g. "
                f"{missing[:3]} (was the model sharded by Composer's FSDP2 from meta?)"
            )

    def _log_done(self) -> None:
        seconds = time.monotonic() - (self.started or time.monotonic())
        memory = ""
        if self.rss_before is not None and (peak := _peak_rss()) is not None:
            memory = (
                f"; host RSS peak {(peak - self.rss_before) / MB:+.1f} MB over {self.rss_before / MB:.1f} MB"
            )
        log.info(
            "model.pretrained: rank %d read its shard, %.1f MB of %s, in %.1fs%s",
            dist.get_global_rank(),
            self.bytes_read / MB,
            self.folder,
            seconds,
            memory,
        )


def load_pretrained_shards(model: DbrxForCausalLM, folder: str | Path, device_type: str) -> ShardLoader:
    """Make Composer's meta init read `folder`'s shards into `model` (built on meta) instead of
    initialising it randomly. Call before the Trainer, after `mark_fsdp_units`."""
    loader = ShardLoader(model, folder, device_type)
    model.param_init_fn = loader
    route_meta_init_to_shard_loaders()
    return loader


# ---------------------------------------------------------------------------------------------
# Composer's meta init, on the run's device
# ---------------------------------------------------------------------------------------------
def route_meta_init_to_shard_loaders() -> None:
    """Composer 0.32.1's `meta_init` allocates every meta module on 'cuda' (hard-coded), so FSDP2
    from meta cannot run on CPU. For a model whose `param_init_fn` is a ShardLoader, do the same
    walk on the loader's device (CPU or CUDA alike); any other model still gets Composer's own.
    `prepare_distributed.parallelize_composer_model` calls it by this module-level name."""
    from composer.distributed import param_init, prepare_distributed

    if prepare_distributed.meta_init not in (param_init.meta_init, _meta_init):
        raise compat.CompatError(
            "composer.distributed.prepare_distributed.meta_init is not Composer's own function: something "
            "else replaced it; dbrx-train's meta init (training/pretrained_shards.py) cannot run with it"
        )
    compat.replace("composer_meta_init", prepare_distributed, "meta_init", _meta_init)


def _meta_init(module: nn.Module, param_init_fn: Callable[[nn.Module], None] | None = None) -> None:
    from composer.distributed import param_init

    loaders = [
        m.param_init_fn
        for m in module.modules()
        if isinstance(getattr(m, "param_init_fn", None), ShardLoader)
    ]
    if not loaders:
        param_init.meta_init(module, param_init_fn)
        return
    _meta_init_on(module, param_init_fn, device=loaders[0].device)


def _meta_init_on(
    module: nn.Module, param_init_fn: Callable[[nn.Module], None] | None = None, *, device: str
) -> None:
    """Composer's `meta_init` (children first, then the module's own tensors), on `device`."""
    init_fn = getattr(module, "param_init_fn", param_init_fn)
    for child in module.children():
        _meta_init_on(child, init_fn, device=device)
    own = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    if not any(t.is_meta for t in own):
        return
    if init_fn is None or not all(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
        raise RuntimeError(
            f"a {type(module).__name__} is on meta but not FSDP-sharded or has no param_init_fn"
        )
    module.to_empty(device=device, recurse=False)
    init_fn(module)


# ---------------------------------------------------------------------------------------------
# Host memory (Linux /proc; None elsewhere)
# ---------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Start a new peak (VmHWM) at the current RSS; returns that RSS. Where the peak cannot be
    reset, the old one stays and the reported rise is an upper bound."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _peak_rss() -> int | None:
    return _status_bytes("VmHWM")
