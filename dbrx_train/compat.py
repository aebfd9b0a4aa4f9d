"""Every place dbrx-train reaches into a private upstream internal, with the versions it is right for.

Upstream packages do not promise to keep their private functions, attributes or module globals, so
an upgrade can silently change what a patch below assumes. This module is the map: `PATCHES` names
each private internal, the package version(s) the patch was written and checked for, why it exists
and which module uses it. Every use goes through `check(name)` first (or through `replaced`/`swapped`,
which check): on a version outside `verified` the run stops with one line naming the patch, instead
of training on a wrong assumption. tests/test_compat.py shows, for each entry, that the upstream
behaviour the patch assumes (or the bug it works around) is still there on the pinned versions; widen
`verified` only after those tests pass on the new version.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Patch:
    package: str  # the distribution whose internals are used (its pip name)
    verified: str  # PEP 440 versions the patch was written for and tested on (the project's pin)
    internal: str  # the private thing, by its import path
    user: str  # the dbrx-train module that uses it
    why: str  # what breaks without it


PATCHES: dict[str, Patch] = {
    "fsdp2_gloo_average": Patch(
        "torch",
        "==2.7.0",
        "torch.distributed.fsdp._fully_shard._fsdp_collectives._get_gradient_divide_factors",
        "dbrx_train/training/parallelize.py",
        "gloo has no ReduceOp.AVG, so FSDP2's reduce-scatter sums gradients over ranks on CPU",
    ),
    "dcp_restricted_pickle": Patch(
        "torch",
        "==2.7.0",
        "torch.load and torch.distributed.checkpoint.filesystem.pickle (swapped while Composer loads)",
        "dbrx_train/checkpoint/safe_load.py",
        "DCP unpickles .metadata with pickle.load and byte entries with weights_only=False: "
        "a checkpoint file could run code",
    ),
    "dcp_read_metadata": Patch(
        "torch",
        "==2.7.0",
        "torch.distributed.checkpoint.FileSystemReader.read_metadata (storage_meta.load_id)",
        "dbrx_train/checkpoint/safe_load.py",
        "the restricted reader must set what DCP's own read_metadata sets",
    ),
    "numpy_reconstruct": Patch(
        "numpy",
        ">=2.1,<2.2",
        "numpy._core.multiarray._reconstruct",
        "dbrx_train/checkpoint/safe_load.py",
        "numpy arrays in Composer's RNG state pickle through it; weights_only loading must allow it",
    ),
    "streaming_shm_prefix": Patch(
        "mosaicml-streaming",
        "==0.13.0",
        "streaming.base.dataset.get_shm_prefix and streaming.base.shared.prefix's private helpers",
        "dbrx_train/data/streaming_shm.py",
        "every rank probes /dev/shm on its own: datasets started at once pick the same prefix",
    ),
    "composer_progress_bar": Patch(
        "mosaicml",
        "==0.32.1",
        "composer.loggers.ProgressBarLogger.train_pbar/eval_pbar and _ProgressBar.metrics/.pbar",
        "dbrx_train/training/progress.py",
        "Composer's bar shows only losses; throughput, MFU and ETA go into its postfix",
    ),
    "composer_meta_init": Patch(
        "mosaicml",
        "==0.32.1",
        "composer.distributed.prepare_distributed.meta_init",
        "dbrx_train/training/pretrained_shards.py",
        "Composer's meta init allocates on 'cuda' only; per-shard loading must run on CPU too",
    ),
    "flex_block_mask_compile": Patch(
        "torch",
        "==2.7.0",
        "torch.nn.attention.flex_attention.create_block_mask(_compile=...)",
        "dbrx_train/model/dbrx.py",
        "an eager BlockMask of packed documents materialises (B, T, T) on CUDA; compiled, it is built by blocks",
    ),
    "composer_cpu_amp_bf16": Patch(
        "mosaicml",
        "==0.32.1",
        "composer.trainer.trainer._validate_precision/get_precision_context and "
        "composer.distributed.prepare_distributed._validate_precision",
        "dbrx_train/training/cpu.py",
        "Composer refuses precision amp_bf16 on CPU and enters no autocast for it there",
    ),
    "composer_env_cpu_probe": Patch(
        "mosaicml",
        "==0.32.1",
        "composer.trainer.trainer.get_composer_env_dict (the Trainer reads 2 of its keys)",
        "dbrx_train/training/composer_env.py",
        "building the dict starts a py-cpuinfo subprocess (~1 s per rank start) for a CPU name the Trainer discards",
    ),
    "torch_cpu_bf16_isa": Patch(
        "torch",
        "==2.7.0",
        "torch.cpu._is_avx512_bf16_supported and torch.cpu._is_amx_tile_supported",
        "dbrx_train/training/cpu.py",
        "the only way torch tells whether its CPU GEMMs multiply bf16 natively",
    ),
    "tiktoken_mergeable_ranks": Patch(
        "tiktoken",
        ">=0.14,<0.15",
        "tiktoken.Encoding._mergeable_ranks",
        "dbrx_train/data/hf_tokenizer.py",
        "the Hugging Face tokenizer export needs the BPE ranks, which tiktoken keeps private",
    ),
}


class CompatError(RuntimeError):
    """An installed package is outside the versions a private patch was verified on."""


@functools.cache
def _installed(package: str) -> str:
    return metadata.version(package)


def check(name: str) -> Patch:
    """The patch `name`, after checking the installed version is one it was verified on."""
    patch = PATCHES[name]
    installed = _installed(patch.package)
    if Version(installed) not in SpecifierSet(patch.verified):
        raise CompatError(
            f"{patch.package} {installed} is installed, but dbrx-train's patch '{name}' of "
            f"{patch.internal} ({patch.user}) was verified only on {patch.package}{patch.verified}: "
            f"install {patch.package}{patch.verified} (the project's pin), or run tests/test_compat.py "
            "on this version and widen `verified` in dbrx_train/compat.py"
        )
    return patch


def replace(name: str, owner: Any, attribute: str, new: Callable[..., Any]) -> Callable[..., Any]:
    """Replace `owner.attribute` with `new` for the rest of the process (once: a second call with a
    function marked by this module keeps the first). Returns what it replaced."""
    check(name)
    current = getattr(owner, attribute)
    if getattr(current, "_dbrx_compat_patch", None) == name:
        return current._dbrx_compat_original
    new._dbrx_compat_patch = name
    new._dbrx_compat_original = current
    setattr(owner, attribute, new)
    return current


@contextlib.contextmanager
def swapped(name: str, owner: Any, **attributes: Any) -> Iterator[None]:
    """`owner`'s attributes replaced while the block runs, then restored."""
    check(name)
    originals = {attribute: getattr(owner, attribute) for attribute in attributes}
    for attribute, value in attributes.items():
        setattr(owner, attribute, value)
    try:
        yield
    finally:
        for attribute, value in originals.items():
            setattr(owner, attribute, value)
