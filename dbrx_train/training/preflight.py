"""Every check that can fail a run before it starts, each naming the key or file and what to do.

`check_config` runs right after the config is parsed, before any process group, model or dataset
exists, so a bad YAML costs seconds, not a GPU-hour. `check_checkpoint_space` runs once the model
is built (it needs the parameters' sizes) and before the first step.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from composer.core import Time
from composer.utils import dist

from dbrx_train.checkpoint.adapters import adapter_mismatch, checkpoint_adapter_shapes
from dbrx_train.checkpoint.space import checkpoint_space, export_space, saves_to_write
from dbrx_train.checkpoint.start import Start
from dbrx_train.config.run import TrainConfig
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.finetuning import FinetuningLoaderConfig
from dbrx_train.data.finetuning_files import tokenize_once
from dbrx_train.data.loaders import validate_loader_config
from dbrx_train.data.streaming_shm import release_stale_shared_memory
from dbrx_train.eval.icl_suite import read_icl_tasks
from dbrx_train.model.hf import check_hf_folder
from dbrx_train.model.lora import adapter_shapes
from dbrx_train.model.lora_export import peft_unsupported
from dbrx_train.model.moe import MoEBackend, resolve_moe_backend
from dbrx_train.training import cpu
from dbrx_train.training.builders import hf_export_folder
from dbrx_train.training.parallelize import check_expert_parallel, expert_parallel_degree

log = logging.getLogger("dbrx_train")


def check_config(cfg: TrainConfig, device: str, world_size: int) -> MoEBackend:
    """The checks that need only the config and the machine; every one runs, and all the problems
    found are raised together. Returns the experts' backend, resolved here once for the run's device:
    train.py builds every MoE layer with it."""
    backend: list[MoEBackend] = []
    checks = (
        lambda: check_durations(cfg),
        lambda: check_init_device(cfg, device),
        lambda: check_precision(cfg, device),
        lambda: backend.append(check_moe_backend(cfg, device)),
        lambda: check_expert_parallel(cfg, world_size),
        lambda: check_compile(cfg, device),
        lambda: check_pretrained(cfg),
        lambda: check_load_path(cfg),
        lambda: check_lora(cfg),
        lambda: check_expert_bias_export(cfg),
        lambda: check_data(cfg),
        lambda: read_icl_tasks(cfg.icl_tasks or []),  # every task file, line by line
    )
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return backend[0]


def check_expert_bias_export(cfg: TrainConfig) -> None:
    """Bias balancing trains state HF DBRX cannot hold: an HF export must say it drops it."""
    hf = cfg.callbacks.hf_export
    if hf is None or cfg.model.dbrx.ffn_config.moe_bias_update_rate == 0:
        return
    if not hf.drop_expert_bias:
        raise ConfigError(
            "callbacks.hf_export: model.ffn_config.moe_bias_update_rate > 0 trains per-expert routing biases "
            "that HF DBRX has no place for, so the export would route differently; set "
            "callbacks.hf_export.drop_expert_bias: true to export without them (the change in top-k choices "
            "is measured on an eval batch), or remove callbacks.hf_export"
        )
    if cfg.eval_loader is None:
        raise ConfigError(
            "callbacks.hf_export.drop_expert_bias measures how much the top-k choices change on the first "
            "eval batch; add an eval_loader (held-out data)"
        )


def check_data(cfg: TrainConfig) -> None:
    """Missing folders, wrong sequence length, out-of-vocab ids: found before any process group starts.
    hf_name files are tokenized here (once, local rank 0), so a bad row stops the run before it starts."""
    vocab = cfg.model.dbrx.vocab_size
    try:
        for key in ("train_loader", "eval_loader"):
            loader = getattr(cfg, key)
            if isinstance(loader, FinetuningLoaderConfig):
                tokenize_once(loader, cfg.max_seq_len, key, dist.get_local_rank())
        validate_loader_config(cfg.train_loader, cfg.max_seq_len, vocab)
        if cfg.eval_loader is not None:
            validate_loader_config(cfg.eval_loader, cfg.max_seq_len, vocab, config_key="eval_loader")
    except (ValueError, OSError) as e:  # OSError: e.g. a shard file that may not be read
        raise ConfigError(str(e)) from e
    # Before any dataset exists: Streaming shared memory of killed runs (never of live ones).
    stale = release_stale_shared_memory()
    if stale:
        print(
            f"dbrx-train: removed Streaming shared memory of killed runs: {', '.join(stale)}", file=sys.stderr
        )


def check_durations(cfg: TrainConfig) -> None:
    """max_duration 0 trains nothing (and breaks a curriculum's plan); eval_interval 0 turns evaluation off,
    which Composer does without a word: say so."""
    if Time.from_timestring(cfg.max_duration).value <= 0:
        raise ConfigError(
            f"config key 'max_duration' must be more than 0 (e.g. 100ba); got {cfg.max_duration!r}. To check a "
            f"config without training, see scripts/model_stats.py"
        )
    if evaluation_off(cfg) and cfg.eval_loader is not None and dist.get_global_rank() == 0:
        print(
            f"dbrx-train: eval_interval is {cfg.eval_interval}: evaluation is off (eval_loader is not used)",
            file=sys.stderr,
            flush=True,
        )


def evaluation_off(cfg: TrainConfig) -> bool:
    return Time.from_timestring(cfg.eval_interval).value == 0


def check_pretrained(cfg: TrainConfig) -> None:
    """model.pretrained: every weight file and tensor present with the config's shapes (headers only)."""
    folder = cfg.model.pretrained
    if folder is None:
        return
    try:
        check_hf_folder(folder, cfg.model.dbrx)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.pretrained: {e}") from e


def check_load_path(cfg: TrainConfig) -> None:
    """A missing local checkpoint to start from (e.g. fine-tuning before pretraining) says how to make it."""
    path = cfg.load_path
    if path is None or "://" in path or Path(path).exists():
        return
    raise ConfigError(
        f"load_path '{path}' does not exist. To fine-tune the tiny model, pretrain it first: `make pretrain` "
        f"(or `composer train.py yamls/pretrain/dbrx-tiny.yaml`), which writes runs/dbrx-tiny/; "
        f"or point load_path at another Composer checkpoint"
    )


def check_lora(cfg: TrainConfig) -> None:
    """model.peft_config against the rest of the run, and any load_path's adapters against the run's."""
    peft = cfg.model.peft_config
    if peft is not None:
        if cfg.model.pretrained is None:
            raise ConfigError(
                "model.peft_config trains adapters on a frozen base: set model.pretrained to the base's HF DBRX "
                "folder (scripts/convert_to_hf.py writes one from a Composer checkpoint)"
            )
        if expert_parallel_degree(cfg.fsdp) > 1:
            raise ConfigError(
                "fsdp_config.expert_parallel_degree does not work with model.peft_config (LoRA); set it to null: "
                "FSDP then shards the experts and their adapters over all ranks"
            )
        if cfg.model.init_device == "meta":
            # The per-shard loader (training/pretrained_shards.py) fills base tensors from the folder;
            # the adapters are in no folder and it has no initialisation for them yet.
            raise ConfigError(
                "model.init_device: meta does not work with model.peft_config (LoRA) yet: the per-shard loader "
                "cannot initialise the adapters; use init_device: mixed (rank 0 reads the base, then shards it)"
            )
        hf = cfg.callbacks.hf_export
        problem = peft_unsupported(peft.spec)
        if hf is not None and hf.adapters != "merged" and problem is not None:
            raise ConfigError(f"callbacks.hf_export.adapters: {hf.adapters}: {problem} (adapters: merged)")
    path = cfg.load_path
    if path is None or "://" in path or not Path(path).exists():
        return
    try:
        found, has_base = checkpoint_adapter_shapes(path)
    except (ValueError, FileNotFoundError, OSError):
        return  # not a readable checkpoint: choose_start reports it, naming the file
    if peft is None and found and not has_base:
        raise ConfigError(
            f"load_path {path} holds only LoRA adapters (its run had model.peft_config): set the same "
            "model.peft_config and model.pretrained to continue from it, or write the merged model with "
            "scripts/convert_to_hf.py and start from that (model.pretrained)"
        )
    if peft is None:
        return
    if not found:
        raise ConfigError(
            f"load_path {path} holds no LoRA adapters (a full checkpoint): a LoRA run reads its base from "
            "model.pretrained; to start from this checkpoint, convert it with scripts/convert_to_hf.py and set "
            "model.pretrained to the folder"
        )
    mismatch = adapter_mismatch(found, adapter_shapes(cfg.model.dbrx, peft.spec))
    if mismatch is not None:
        raise ConfigError(f"load_path {path} {mismatch}")


def check_checkpoint_space(cfg: TrainConfig, run_folder: Path, model: torch.nn.Module, start: Start) -> None:
    """No room for even one checkpoint (or HF export): refuse before the first step. Too little for
    all that the run will write: warn."""
    parameters = list(model.parameters())
    checks = [
        checkpoint_space(
            run_folder,
            [p for p in parameters if p.requires_grad],  # a LoRA checkpoint leaves out the frozen base
            cfg.optimizer.name,
            cfg.save_num_checkpoints_to_keep,
            saves_to_write(cfg.max_duration, cfg.save_interval, start.batch),
        )
    ]
    hf = cfg.callbacks.hf_export
    if hf is not None:
        exports = saves_to_write(cfg.max_duration, hf.save_interval, start.batch)
        # Exports are not in checkpoints: a run resumed at its end still exports once, at fit end.
        exports = None if exports is None else max(exports, 1)
        folder = Path(hf_export_folder(cfg, str(run_folder)))
        checks.append(export_space(folder, parameters, hf.dtype, hf.tokenizer, exports))
    for error, _ in checks:
        if error is not None:
            raise ConfigError(error)
    for _, warning in checks:
        if warning is not None and dist.get_global_rank() == 0:
            print(f"dbrx-train: warning: {warning}", file=sys.stderr, flush=True)


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: gpu was asked for but CUDA is not available; use device: auto or cpu")
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """precision: auto is amp_bf16 on GPUs and on CPUs that multiply bf16 natively (AVX512-BF16 or
    AMX; training/cpu.py), fp32 on other CPUs, where bf16 is emulated and slower. On CPU, `make
    train`'s pretraining in amp_bf16 ends within 2% of the fp32 run's eval loss (docs/performance.md)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if device == "gpu" or cpu.native_bf16_matmul() else "fp32"


def check_precision(cfg: TrainConfig, device: str) -> None:
    """amp_fp16 needs CUDA (Composer has no CPU path for it); amp_bf16 on a CPU without bf16
    instructions runs, emulated, slower than fp32: say so."""
    if device != "cpu":
        return
    if cfg.precision == "amp_fp16":
        raise ConfigError("precision: amp_fp16 needs a GPU; on CPU use amp_bf16, fp32 or auto")
    if cfg.precision == "amp_bf16" and not cpu.native_bf16_matmul():
        log.warning(
            "precision: amp_bf16 on a CPU without native bf16 matmul (no AVX512-BF16/AMX): bf16 is emulated "
            "and slower than fp32 here"
        )


# The dtype the experts compute in under each precision (autocast's, or the parameters').
PRECISION_DTYPES = {"fp32": torch.float32, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def check_moe_backend(cfg: TrainConfig, device: str) -> MoEBackend:
    """Resolve model.ffn_config.moe_backend for the run's device, and refuse what its experts cannot
    run (the megablocks kernels: bf16 on CUDA only) before anything is built, rather than at the first
    forward. Returns the backend."""
    try:
        backend = resolve_moe_backend(
            cfg.model.dbrx.ffn_config.moe_backend, "cuda" if device == "gpu" else "cpu"
        )
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    precision = resolve_precision(cfg, device)
    why_not = backend.unsupported("cuda" if device == "gpu" else "cpu", PRECISION_DTYPES[precision])
    problems = []
    if why_not is not None and backend.torch_fallback:
        log.info(
            "moe_backend auto: %s %s, so with precision %s the experts run the torch backend's code",
            backend.name,
            why_not,
            precision,
        )
    elif why_not is not None:
        problems.append(
            f"model.ffn_config.moe_backend: {backend.name} {why_not}, but precision is {precision}; use "
            f"precision: amp_bf16 (or auto), or moe_backend: torch"
        )
    if expert_parallel_degree(cfg.fsdp) > 1 and not backend.torch_fallback:
        problems.append(
            "fsdp_config.expert_parallel_degree runs the torch backend's experts; set "
            "model.ffn_config.moe_backend: torch (or auto)"
        )
    if problems:
        raise ConfigError(problems)
    return backend


def check_compile(cfg: TrainConfig, device: str) -> None:
    """torch.compile on CPU writes C++ and builds it: without a compiler it fails at the first batch."""
    if cfg.compile_config is None or device != "cpu":
        return
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        raise ConfigError(
            "compile_config: torch.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX) and none "
            "was found; install one or set compile_config: null"
        )


def check_init_device(cfg: TrainConfig, device: str) -> None:
    init_device = cfg.model.init_device
    if init_device != "cpu" and cfg.fsdp is None:
        raise ConfigError(
            f"model.init_device: {init_device} needs FSDP (fsdp_config) to materialise the weights"
        )
    if init_device == "meta" and device != "gpu" and cfg.model.pretrained is None:
        # DTensor's random ops keep no per-shard RNG offsets on CPU: every rank would draw the same
        # values into its shard (e.g. experts 8-15 copies of 0-7). Loading shards needs no RNG.
        raise ConfigError(
            "model.init_device: meta initialises random weights shard by shard, which needs CUDA; on CPU "
            "use 'cpu' or 'mixed' (or meta with model.pretrained, which reads each shard from the folder)"
        )
