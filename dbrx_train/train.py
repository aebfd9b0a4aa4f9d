"""``composer train.py <yaml> [key=value ...]``: config -> model -> data -> callbacks -> Trainer.fit."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Evaluator, Time, TimeUnit
from composer.utils import dist, reproducibility
from omegaconf import OmegaConf

from dbrx_train.checkpoint_store import CheckpointError, list_checkpoints, restricted_loading
from dbrx_train.config import BatchLayout, TrainConfig, batch_layout, load_config, parse_config, resolved_dict
from dbrx_train.data.integrity import ShardReadError
from dbrx_train.data.loaders import build_dataloader, validate_loader_config
from dbrx_train.data.streaming_shm import release_stale_shared_memory
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.compile import compile_regions
from dbrx_train.model.hf import check_hf_folder, load_hf_weights
from dbrx_train.model.moe import MegaBlocksExperts
from dbrx_train.model.stats import count_params
from dbrx_train.report import write_report
from dbrx_train.schema import ConfigError
from dbrx_train.training.builders import (
    build_algorithms,
    build_callbacks,
    build_hf_export,
    build_loggers,
    build_optimizer,
    build_scheduler,
    hf_export_folder,
)
from dbrx_train.training.callbacks import BatchSeededRNG
from dbrx_train.training.checkpointing import (
    CheckpointManager,
    CheckpointSaveError,
    Start,
    checkpoint_space,
    later_checkpoints,
    resolve_start,
)
from dbrx_train.training.composer_model import DbrxComposerModel
from dbrx_train.training.curriculum import build_train_data
from dbrx_train.training.hf_export import HFExport, HFExportError, export_space
from dbrx_train.training.nonfinite import exit_if_stopped, guard_of
from dbrx_train.training.object_store import RemoteCheckpoints
from dbrx_train.training.parallelize import (
    apply_expert_parallelism,
    build_parallelism_config,
    check_expert_parallel,
    expert_parallel_degree,
    mark_fsdp_units,
)
from dbrx_train.training.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from dbrx_train.training.preemption import PreemptionHandler
from dbrx_train.training.rank_zero import on_rank0
from dbrx_train.training.resume_guard import check_resume_config

log = logging.getLogger("dbrx_train")

USAGE = "usage: composer train.py <config.yaml> [key=value ...]   (or: python train.py ...)"


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    try:
        cfg = load_config(argv[0], argv[1:])
        layout = batch_layout(cfg, dist.get_world_size())
        device = resolve_device(cfg)
        check_init_device(cfg, device)
        check_moe_backend(cfg, device)
        check_expert_parallel(cfg, layout.world_size)
        check_compile(cfg, device)
        check_pretrained(cfg)
        check_load_path(cfg)
        check_data(cfg)
    except ConfigError as e:
        # One clear line per rank instead of a traceback through the config machinery.
        print(f"dbrx-train: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return train(cfg, layout, device)
    except (ConfigError, CheckpointError) as e:
        print(f"dbrx-train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (CheckpointSaveError, HFExportError, ShardReadError) as e:
        print(f"dbrx-train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def check_data(cfg: TrainConfig) -> None:
    """Missing folders, wrong sequence length, out-of-vocab ids: found before any process group starts."""
    vocab = cfg.model.dbrx.vocab_size
    try:
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


def check_pretrained(cfg: TrainConfig) -> None:
    """model.pretrained: every weight file and tensor present with the config's shapes (headers only)."""
    folder = cfg.model.pretrained
    if folder is None:
        return
    if cfg.model.init_device == "meta":
        raise ConfigError(
            "model.pretrained with init_device: meta is not supported (weights would be random-"
            "initialised after sharding); use init_device: mixed (rank 0 loads, FSDP broadcasts) or cpu"
        )
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


def train(cfg: TrainConfig, layout: BatchLayout, device: str) -> Trainer:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    precision = resolve_precision(cfg, device)
    if cfg.fsdp is not None or layout.world_size > 1:
        dist.initialize_dist(device, cfg.dist_timeout)
    run_name = cfg.run_name or shared_run_name()
    save_folder = (cfg.save_folder or "runs/{run_name}").format(run_name=run_name)
    # From here on every builder sees the run's actual name and folder.
    cfg = dataclasses.replace(cfg, run_name=run_name, save_folder=save_folder)
    resolved = resolved_dict(cfg)
    # An object-store save_folder: checkpoints are written in runs/{run_name} first, then uploaded.
    remote = RemoteCheckpoints(save_folder) if "://" in save_folder else None
    run_folder = f"runs/{run_name}" if remote is not None else save_folder
    start = choose_start(cfg, Path(run_folder), resolved, remote)
    write_resolved_config(resolved, run_folder)

    model = build_model(cfg)
    if cfg.compile_config is not None:  # before FSDP and activation checkpointing wrap it
        c = cfg.compile_config
        compile_regions(model, c.regions, mode=c.mode, dynamic=c.dynamic)
    parallelism = None
    device_type = "cuda" if device == "gpu" else "cpu"
    if (degree := expert_parallel_degree(cfg.fsdp)) > 1:
        swapped = apply_expert_parallelism(model, cfg.fsdp, precision, device_type)
        log.info(
            "expert parallelism: %d MoE layers, %d experts per rank (the torch backend's code)",
            swapped,
            cfg.model.dbrx.ffn_config.moe_num_experts // degree,
        )
    if cfg.fsdp is not None:
        mark_fsdp_units(model)
        parallelism = build_parallelism_config(cfg.fsdp, device_type)
    composer_model = DbrxComposerModel(model)
    optimizer = build_optimizer(cfg, composer_model.parameters())
    check_checkpoint_space(cfg, Path(run_folder), model, start)

    train_loader, data_callbacks = build_train_data(cfg, layout)
    evaluators = []
    if cfg.eval_loader is not None:
        eval_loader = build_dataloader(
            cfg.eval_loader,
            device_batch_size=layout.device_eval_batch_size,
            max_seq_len=cfg.max_seq_len,
            vocab_size=cfg.model.dbrx.vocab_size,
            seed=cfg.seed,
            config_key="eval_loader",
        )
        evaluators.append(
            Evaluator(label="eval", dataloader=eval_loader, metric_names=list(composer_model.get_metrics()))
        )

    checkpoints = CheckpointManager(
        run_folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, resolved, remote
    )
    preemption = PreemptionHandler()
    hf_export = build_hf_export(cfg, run_folder)
    # Composer loads start.load_path while building the Trainer: no pickled code from it can run.
    with restricted_loading():
        trainer = Trainer(
            run_name=run_name,
            seed=cfg.seed,
            model=composer_model,
            train_dataloader=train_loader,
            eval_dataloader=evaluators or None,
            eval_interval=cfg.eval_interval,
            eval_subset_num_batches=cfg.eval_subset_num_batches,
            optimizers=optimizer,
            schedulers=build_scheduler(cfg.scheduler),
            max_duration=cfg.max_duration,
            device=device,
            precision=precision,
            device_train_microbatch_size=layout.device_train_microbatch_size,
            parallelism_config=parallelism,
            algorithms=build_algorithms(cfg),
            loggers=build_loggers(cfg, run_folder),
            callbacks=[
                *build_callbacks(cfg, run_folder),
                *data_callbacks,
                BatchSeededRNG(cfg.seed),
                preemption,
                checkpoints,  # saves after every other callback has updated its state
                *([hf_export] if hf_export is not None else []),  # after the checkpoint it must not cost
            ],
            log_to_console=False,  # our ConsoleLogger, configured by console_log_interval, replaces it
            progress_bar=False,  # our TrainingProgressBar (loggers), which also shows tokens/s, MFU and ETA
            save_folder=None,  # checkpoints are written and committed by CheckpointManager
            load_path=start.load_path,  # chosen and verified by choose_start (also for autoresume)
            load_weights_only=start.weights_only,
            dist_timeout=cfg.dist_timeout,
        )
    trainer.logger.log_hyperparameters(resolved)  # the whole resolved config, e.g. into W&B's run config
    if already_finished(trainer):
        finish_without_training(trainer, hf_export, start)
        return trainer
    started = time.monotonic()
    if cfg.eval_first and evaluators and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()  # a baseline before the first step (not again when resuming)
    trainer.fit()
    guard = guard_of(trainer)
    stopped_early = preemption.stopped_at_batch is not None or (guard is not None and guard.stopped_at_batch)
    print_summary(trainer, run_folder, time.monotonic() - started, stopped_early=bool(stopped_early))
    exit_if_stopped(trainer)  # a non-finite loss stopped the run: say where and why, exit code 3
    if preemption.stopped_at_batch is not None:
        if dist.get_global_rank() == 0:
            last = checkpoints.saved[-1].path if checkpoints.saved else "none"
            print(
                f"dbrx-train: stopped by SIGTERM after batch {preemption.stopped_at_batch}; checkpoint {last}. "
                "Run the same command (with autoresume: true) to continue from it.",
                flush=True,
            )
        raise SystemExit(PREEMPTED_EXIT_CODE)
    return trainer


def already_finished(trainer: Trainer) -> bool:
    """The checkpoint it resumed from is at max_duration (the same command run again after the end)."""
    max_duration = trainer.state.max_duration
    return max_duration is not None and trainer.state.timestamp.get(max_duration.unit) >= max_duration


def finish_without_training(trainer: Trainer, hf_export: HFExport | None, start: Start) -> None:
    """Composer would refuse with a traceback; say so in one line, and write the final HF export if
    it is missing (e.g. it failed for lack of space after the last checkpoint was committed)."""
    batch = int(trainer.state.timestamp.batch)
    if hf_export is not None and not hf_export.export_folder(batch).exists():
        written = hf_export.export(trainer.state)
        if dist.get_global_rank() == 0:
            print(f"dbrx-train: wrote the missing HF export {written}", flush=True)
    if dist.get_global_rank() == 0:
        print(
            f"dbrx-train: nothing to train: {start.checkpoint.path if start.checkpoint else 'the start'} is at "
            f"batch {batch}, already max_duration {trainer.state.max_duration}; raise max_duration to train "
            "further",
            flush=True,
        )


def choose_start(
    cfg: TrainConfig, run_folder: Path, resolved: dict, remote: RemoteCheckpoints | None
) -> Start:
    """What the run loads (autoresume's newest good checkpoint, or load_path), checked before any work."""
    start = resolve_start(
        run_folder,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        hashes=cfg.checkpoint_verify == "hash",
        remote=remote,
    )
    if start.checkpoint is not None and start.resumed:
        saved = normalized_config(start.checkpoint.manifest.get("config") or {})
        try:
            accepted = check_resume_config(saved, resolved, cfg.allow_config_changes, start.checkpoint.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        interesting = [line for line in accepted if not line.startswith(("run_name", "save_folder"))]
        if interesting and dist.get_global_rank() == 0:
            log.info("resuming with changed settings: %s", "; ".join(interesting))
        log.info("resuming from %s (batch %d)", start.checkpoint.path, start.checkpoint.batch)
    later = later_checkpoints(run_folder, start)
    if start.checkpoint is not None and any(c.path == start.checkpoint.path for c in later):
        raise ConfigError(
            f"load_path {start.checkpoint.path} lies in save_folder {run_folder}, and this run starts at batch "
            f"{start.batch} (load_weights_only): its own checkpoints would mix with that one. Choose another "
            f"save_folder"
        )
    if later:
        names = ", ".join(c.name for c in later)
        if not cfg.save_overwrite:
            raise ConfigError(
                f"save_folder {run_folder} already holds checkpoints past this run's start (batch {start.batch}): "
                f"{names}. Set autoresume: true to continue that run, save_overwrite: true to replace them, "
                f"or choose another save_folder"
            )
        dist.barrier()  # every rank has listed them before rank 0 deletes them
        on_rank0(lambda: [shutil.rmtree(checkpoint.path) for checkpoint in later])
        log.warning("save_overwrite: removed checkpoints past the start (batch %d): %s", start.batch, names)
    return start


def saves_to_write(max_duration: str, save_interval: str, start_batch: int) -> int | None:
    """How many checkpoints (or HF exports) a run writes from start_batch on: one every save_interval,
    and one at the end when that is not a multiple of it. None when either is not in batches."""
    total, every = Time.from_timestring(max_duration), Time.from_timestring(save_interval)
    if total.unit != TimeUnit.BATCH or every.unit != TimeUnit.BATCH or every.value <= 0:
        return None
    at_interval = total.value // every.value - min(start_batch, total.value) // every.value
    return at_interval + (1 if total.value % every.value and start_batch < total.value else 0)


def check_checkpoint_space(cfg: TrainConfig, run_folder: Path, model: torch.nn.Module, start: Start) -> None:
    """No room for even one checkpoint (or HF export): refuse before the first step. Too little for
    all that the run will write: warn."""
    parameters = list(model.parameters())
    checks = [
        checkpoint_space(
            run_folder,
            parameters,
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


def normalized_config(saved: dict) -> dict:
    """The checkpoint's config through today's schema, so keys added since then compare as their defaults."""
    try:
        return resolved_dict(parse_config(copy.deepcopy(saved)))
    except ConfigError:
        return saved  # a key since removed or renamed: compare what was written


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: gpu was asked for but CUDA is not available; use device: auto or cpu")
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    return cfg.precision if cfg.precision != "auto" else ("amp_bf16" if device == "gpu" else "fp32")


def check_moe_backend(cfg: TrainConfig, device: str) -> None:
    """The megablocks backend runs bf16 CUDA kernels (grouped_gemm has no other dtype): say so before
    anything is built, rather than at the first forward."""
    requested = cfg.model.dbrx.ffn_config.moe_backend
    if requested == "auto" and device == "gpu" and resolve_precision(cfg, device) != "amp_bf16":
        log.info(
            "moe_backend auto: precision %s is not amp_bf16, so the experts run the torch backend's code "
            "(MegaBlocks' grouped GEMMs are bf16 only)",
            resolve_precision(cfg, device),
        )
    if requested != "megablocks":
        return
    if device != "gpu":
        raise ConfigError(
            "model.ffn_config.moe_backend: megablocks runs CUDA kernels but this run is on CPU; "
            "use moe_backend: torch (or auto)"
        )
    precision = resolve_precision(cfg, device)
    if precision != "amp_bf16":
        raise ConfigError(
            f"model.ffn_config.moe_backend: megablocks computes the experts in bf16 only, but precision is "
            f"{precision}; use precision: amp_bf16 (or auto), or moe_backend: torch"
        )


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


def shared_run_name() -> str:
    name = [datetime.datetime.now().strftime("dbrx-%Y%m%d-%H%M%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(name)  # every rank must agree on the run folder
    return name[0]


def check_init_device(cfg: TrainConfig, device: str) -> None:
    init_device = cfg.model.init_device
    if init_device != "cpu" and cfg.fsdp is None:
        raise ConfigError(
            f"model.init_device: {init_device} needs FSDP (fsdp_config) to materialise the weights"
        )
    if init_device == "meta" and device != "gpu":
        # Composer materialises meta modules on CUDA only; on CPU rank 0 can build and broadcast.
        raise ConfigError("model.init_device: meta needs CUDA; on CPU use 'cpu' or 'mixed'")


def build_model(cfg: TrainConfig) -> DbrxForCausalLM:
    """Weights from the run seed, so every rank that builds them builds the same ones."""
    reproducibility.seed_all(cfg.seed)
    init_device = cfg.model.init_device
    on_meta = init_device == "meta" or (init_device == "mixed" and dist.get_global_rank() != 0)
    pretrained = cfg.model.pretrained
    with torch.device("meta" if on_meta or pretrained else "cpu"):
        model = DbrxForCausalLM(cfg.model.dbrx)
    if pretrained and not on_meta:
        # No random init to overwrite: allocate, fill the RoPE buffers, copy tensor by tensor.
        model.to_empty(device="cpu")
        model.transformer.rotary.init_weights()
        load_hf_weights(model, pretrained)
        log.info("loaded pretrained weights from %s", pretrained)
    elif not on_meta:
        model.init_weights()
    counts = count_params(cfg.model.dbrx)
    log.info("DBRX model: %.2fM total / %.2fM active parameters", counts.total / 1e6, counts.active / 1e6)
    experts = model.transformer.blocks[0].ffn.experts
    log.info(
        "MoE experts: %s backend (model.ffn_config.moe_backend: %s)",
        "megablocks" if isinstance(experts, MegaBlocksExperts) else "torch",
        cfg.model.dbrx.ffn_config.moe_backend,
    )
    return model


def write_resolved_config(resolved: dict, run_folder: str) -> None:
    if dist.get_global_rank() != 0:
        return
    folder = Path(run_folder)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), folder / "config.yaml")


def print_summary(trainer: Trainer, run_folder: str, seconds: float, *, stopped_early: bool = False) -> None:
    """What a user looks for at the end: how far, how good, where the checkpoints and report are."""
    if dist.get_global_rank() != 0:
        return
    state = trainer.state
    losses = getattr(state, "total_loss_dict", {}) or {}
    how = "stopped early after" if stopped_early else "finished"  # the reason follows the summary
    lines = [
        f"dbrx-train: {how} {int(state.timestamp.batch)} batches, {int(state.timestamp.token):,} tokens "
        f"in {seconds:.0f}s",
    ]
    if "loss/train/total" in losses:
        lines.append(f"  final train loss: {losses['loss/train/total']:.4f}")
    folder = Path(run_folder)
    checkpoints = [c.name for c in list_checkpoints(folder)]
    lines.append(f"  run folder: {folder}")
    lines.append(f"  checkpoints: {', '.join(checkpoints) if checkpoints else 'none saved'}")
    try:
        report = write_report(folder)
    except (OSError, ValueError) as e:  # a report is a convenience; never fail a finished run
        lines.append(f"  report: not written ({e})")
    else:
        best = report.summary["best_eval_loss"]
        if best is not None:
            lines.append(f"  best eval loss: {best:.4f}")
        lines.append(f"  report: {report.html}")
    print("\n".join(lines), flush=True)
