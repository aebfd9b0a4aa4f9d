"""Hugging Face DBRX folders: read their config and weights into our model, write them from ours.

An HF DBRX folder holds `config.json` (transformers.DbrxConfig), the weights as `model.safetensors`
or as shards `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`, and
usually `generation_config.json` and tokenizer files. Our parameter names equal HF's, so import
and export are loops over keys with a shape check each, no rename table.

Memory: reading copies row ranges of one tensor at a time into already allocated tensors (the
whole model, or one rank's FSDP shard of it: `read_hf_rows`), with at most `ROW_CHUNK_BYTES` of a
file mapped at once; writing streams one tensor at a time from a name -> tensor callback straight
into the file (our own safetensors writer: 8-byte header length, JSON header, raw little-endian
bytes), so exporting never needs a second copy of the model, even when the source is a sharded
checkpoint read key by key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from dbrx_train.model.config import DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig
from dbrx_train.model.dbrx import DbrxForCausalLM
from dbrx_train.vocab import EOS_TOKEN_IDS, PAD_TOKEN_ID

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size="5GB"
# The dtypes an export may be written in, by the names configs and scripts use.
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
_SAFETENSORS_ITEMSIZE = {code: dtype.itemsize for dtype, code in _SAFETENSORS_DTYPES.items()}
# read_hf_rows maps at most this much of a weight file at once (the host-memory cost of a read).
ROW_CHUNK_BYTES = 16 * 1024**2


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_hf_config_dict(folder: str | Path) -> dict[str, Any]:
    """config.json reduced to DbrxConfig's fields (HF bookkeeping such as `model_type`,
    `architectures`, `transformers_version` and `use_cache` is dropped)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"HF model folder '{folder}' has no {CONFIG_FILE} (looked for {path})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if raw.get("model_type", "dbrx") != "dbrx":
        raise ValueError(f"{path} has model_type {raw['model_type']!r}; only 'dbrx' models can be loaded")
    sections = {"attn_config": DbrxAttentionConfig, "ffn_config": DbrxFFNConfig}
    top = {f.name for f in dataclasses.fields(DbrxConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])}
            out[key] = {k: v for k, v in value.items() if k in names}
        elif key in top:
            out[key] = value
    return out


def read_hf_config(folder: str | Path) -> DbrxConfig:
    config_dict = read_hf_config_dict(folder)
    try:
        return DbrxConfig.from_dict(config_dict)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{Path(folder) / CONFIG_FILE}: {e}") from e


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file holding it; raises naming a missing file."""
    folder = Path(folder)
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no 'weight_map'")
        files = {name: folder / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(
                    f"HF model folder '{folder}': {path.name}, listed in {INDEX_FILE}, is missing"
                )
        return files
    if single_path.is_file():
        with safe_open(single_path, framework="pt") as f:
            return {name: single_path for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise FileNotFoundError(f"HF model folder '{folder}' has neither {SINGLE_FILE} nor {INDEX_FILE}")


def expected_shapes(config: DbrxConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of our (= HF's) DbrxForCausalLM, computed on `meta`."""
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def check_hf_folder(folder: str | Path, config: DbrxConfig | None = None) -> DbrxConfig:
    """Read only headers: config.json parses, every file exists, the tensor names equal the model's
    and each shape matches. Returns the folder's config (or `config`, if given, checked instead).
    Errors name the file (the index or the weight file) and the tensor."""
    config = config or read_hf_config(folder)
    files = weight_files(folder)
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in files]
    unexpected = [name for name in files if name not in shapes]
    if missing or unexpected:
        listing = Path(folder) / (INDEX_FILE if (Path(folder) / INDEX_FILE).is_file() else SINGLE_FILE)
        raise ValueError(
            f"{listing} does not match {CONFIG_FILE}: "
            f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
            for name in names:
                if name not in present:
                    raise ValueError(f"{path}: has no tensor '{name}' (listed for it in {INDEX_FILE})")
                shape = torch.Size(f.get_slice(name).get_shape())
                if shape != shapes[name]:
                    raise ValueError(
                        f"{path}: tensor '{name}' has shape {tuple(shape)}, expected {tuple(shapes[name])}"
                    )
    return config


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> DbrxForCausalLM:
    """An HF DBRX folder (config.json + safetensors, single or sharded) as our model, in fp32."""
    config = check_hf_folder(folder)
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    model.to_empty(device=device)
    model.transformer.rotary.init_weights()  # the only non-checkpoint state
    load_hf_weights(model, folder)
    return model


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy every tensor of the folder into `model`'s (allocated) parameters, one chunk at a time.

    Strict: missing or unexpected names and shape mismatches raise before anything is copied.
    Tensors are cast to each parameter's dtype.
    """
    check_hf_folder(folder, model.config)
    params = model.state_dict()
    files = weight_files(folder)
    for name in files:
        # In chunks: a file kept open keeps every page read from it in the RSS, on top of the model.
        read_hf_rows(files, name, 0, params[name].shape[0], params[name])


@torch.no_grad()
def read_hf_rows(
    files: dict[str, Path],
    name: str,
    start: int,
    stop: int,
    out: torch.Tensor,
    chunk_bytes: int = ROW_CHUNK_BYTES,
) -> int:
    """Copy rows [start, stop) (dim 0) of tensor `name` into `out`, cast to its dtype and device.

    `files` is `weight_files(folder)`. Only those rows' bytes are read (safetensors `get_slice`),
    `chunk_bytes` at a time, and the file is closed after each chunk: the slice is a view of the
    memory-mapped file, whose pages count in the process's RSS until it is unmapped. So reading
    costs at most one chunk on top of `out`. Returns the bytes read.
    """
    path = files[name]
    with safe_open(path, framework="pt") as f:
        file_slice = f.get_slice(name)
        shape, dtype = file_slice.get_shape(), file_slice.get_dtype()
    if dtype not in _SAFETENSORS_ITEMSIZE:
        raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}, which this reader does not know")
    itemsize = _SAFETENSORS_ITEMSIZE[dtype]
    if not shape or not 0 <= start <= stop <= shape[0] or (stop - start, *shape[1:]) != tuple(out.shape):
        raise ValueError(
            f"{path}: tensor '{name}' has shape {tuple(shape)}; its rows [{start}, {stop}) do not fit "
            f"a tensor of shape {tuple(out.shape)}"
        )
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    for first in range(start, stop, rows_per_chunk):
        last = min(stop, first + rows_per_chunk)
        with safe_open(path, framework="pt") as f:
            out[first - start : last - start].copy_(f.get_slice(name)[first:last])
    return (stop - start) * row_bytes


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _write_safetensors(
    path: Path, specs: dict[str, tuple[torch.Size, torch.dtype]], get_tensor: Callable[[str], torch.Tensor]
) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (shape, dtype) in specs.items():
            t = get_tensor(name).detach().to(device="cpu", dtype=dtype).contiguous()
            if t.shape != shape:
                raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t


def write_hf_weights(
    folder: str | Path,
    shapes: dict[str, torch.Size],
    get_tensor: Callable[[str], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when the weights
    exceed `max_shard_bytes`. `get_tensor(name)` is called once per name, in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = {name: (torch.Size(shape), dtype) for name, shape in shapes.items()}
    sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in specs.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    for stale in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a re-export with another shard count must not mix files
    if len(shards) == 1:
        paths = [folder / SINGLE_FILE]
    else:
        paths = [folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # A bar on terminals only (disable=None): exporting 132B parameters takes a while.
    with tqdm(
        total=sum(sizes.values()), unit="B", unit_scale=True, desc="export weights", disable=None
    ) as bar:

        def fetch(name: str) -> torch.Tensor:
            tensor = get_tensor(name)
            bar.update(sizes[name])
            return tensor

        for path, names in zip(paths, shards, strict=False):
            _write_safetensors(path, {name: specs[name] for name in names}, fetch)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {
                name: path.name for path, names in zip(paths, shards, strict=False) for name in names
            },
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def write_hf_config(folder: str | Path, config: DbrxConfig, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json and generation_config.json as transformers writes them for DbrxForCausalLM."""
    import transformers

    if config.tie_word_embeddings:
        raise ValueError(
            "transformers' DbrxForCausalLM does not support tie_word_embeddings=True; "
            "a model with tied embeddings cannot be exported as an HF DBRX folder"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = transformers.DbrxConfig(
        **config.to_hf_dict(),
        architectures=["DbrxForCausalLM"],
        dtype=dtype,
    )  # no pad_token_id here: transformers would make it wte's padding_idx (a frozen row)
    hf_config.save_pretrained(folder)
    generation_config = transformers.GenerationConfig(
        eos_token_id=list(EOS_TOKEN_IDS), pad_token_id=PAD_TOKEN_ID
    )
    generation_config.save_pretrained(folder)


def save_hf_folder(
    folder: str | Path,
    config: DbrxConfig,
    shapes: dict[str, torch.Size],
    get_tensor: Callable[[str], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> None:
    """A complete HF folder: config, generation config, weights and (optionally) tokenizer files."""
    expected = expected_shapes(config)
    if {k: tuple(v) for k, v in shapes.items()} != {k: tuple(v) for k, v in expected.items()}:
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        raise ValueError(
            f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    write_hf_config(folder, config, dtype)
    write_hf_weights(folder, expected, get_tensor, dtype, max_shard_bytes)
    if tokenizer:
        from dbrx_train.data.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(folder)


def save_pretrained(
    model: torch.nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> None:
    """Export an in-memory model; `dtype` defaults to the parameters' own."""
    state = model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    save_hf_folder(
        folder,
        model.config,
        {name: t.shape for name, t in state.items()},
        state.__getitem__,
        dtype,
        max_shard_bytes,
        tokenizer,
    )
