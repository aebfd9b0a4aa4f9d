"""Optimizer, scheduler, algorithms, loggers and callbacks from the typed config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Algorithm, Callback, Event, State
from composer.loggers import FileLogger, Logger, LoggerDestination, WandBLogger
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)

from dbrx_train.checkpoint.hf_export import AdapterExport, HFExport
from dbrx_train.config.run import SchedulerConfig, TrainConfig
from dbrx_train.training.callbacks import TrainPerplexity
from dbrx_train.training.console import ConsoleLine
from dbrx_train.training.expert_load import ExpertLoadMonitor
from dbrx_train.training.expert_parallel import clip_grad_norm_sharded_
from dbrx_train.training.lion import DecoupledLionW
from dbrx_train.training.metrics_file import MetricsFileLogger
from dbrx_train.training.nonfinite import NonFiniteLossGuard
from dbrx_train.training.parallelize import expert_parallel_degree
from dbrx_train.training.peak_flops import device_peak_flops
from dbrx_train.training.progress import TrainingProgressBar
from dbrx_train.training.router_balance import RouterBalance
from dbrx_train.training.sample_log import SampleLog


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "decoupled_adamw":
        return DecoupledAdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "decoupled_lionw":
        return DecoupledLionW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def build_scheduler(sched: SchedulerConfig):
    if sched.name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=sched.t_warmup, alpha_f=sched.alpha_f)
    if sched.name == "linear_decay_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=sched.t_warmup, alpha_f=sched.alpha_f)
    return ConstantWithWarmupScheduler(t_warmup=sched.t_warmup)


class ShardedNormClipping(GradientClipping):
    """Norm clipping when the gradients live on two meshes (expert parallelism): Composer's calls
    torch's clip_grad_norm_, which cannot total DTensors from different meshes."""

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_TRAIN_BATCH:
            clip_grad_norm_sharded_(state.model.parameters(), self.clipping_threshold)


def build_algorithms(cfg: TrainConfig) -> list[Algorithm]:
    algorithms: list[Algorithm] = []
    clip = cfg.algorithms.gradient_clipping
    if clip is not None:
        expert_parallel = expert_parallel_degree(cfg.fsdp) > 1
        # 'value' and 'adaptive' work per parameter, hence on any mix of meshes.
        kind = ShardedNormClipping if expert_parallel and clip.clipping_type == "norm" else GradientClipping
        algorithms.append(kind(clipping_type=clip.clipping_type, clipping_threshold=clip.clipping_threshold))
    return algorithms


def build_loggers(cfg: TrainConfig, run_folder: str) -> list[LoggerDestination]:
    """`run_folder` is local: save_folder, or runs/{run_name} when save_folder is an object-store URI."""
    loggers: list[LoggerDestination] = [MetricsFileLogger(Path(run_folder) / "metrics.jsonl")]
    if cfg.log_to_console:
        loggers.append(ConsoleLine(cfg.console_log_interval))
    if cfg.progress_bar or (cfg.progress_bar is None and sys.stdout.isatty()):
        loggers.append(TrainingProgressBar())
    if cfg.loggers.file is not None:
        loggers.append(
            FileLogger(
                filename=cfg.loggers.file.filename.replace("{save_folder}", run_folder),
                flush_interval=cfg.loggers.file.flush_interval,
            )
        )
    wandb = cfg.loggers.wandb
    if wandb is not None and wandb.mode != "disabled":
        # wandb reads its mode from the environment only; set it here from the config, never the
        # other way round, so an unset variable cannot send a run online by accident.
        os.environ["WANDB_MODE"] = wandb.mode
        os.environ.setdefault("WANDB_DIR", run_folder)
        loggers.append(
            WandBLogger(
                project=wandb.project,
                entity=wandb.entity,
                name=wandb.name or cfg.run_name,
                group=wandb.group,
                tags=wandb.tags,
            )
        )
    return loggers


def build_callbacks(
    cfg: TrainConfig, save_folder: str | None = None, precision: str = "fp32"
) -> list[Callback]:
    """`precision`: the resolved one (preflight.resolve_precision), for the MFU's peak on CPU."""
    nonfinite = cfg.nonfinite_loss
    callbacks: list[Callback] = [
        TrainPerplexity(),
        NonFiniteLossGuard(nonfinite.policy, nonfinite.max_consecutive_skips, save_folder),
    ]
    cb = cfg.callbacks
    if cb.speed_monitor is not None:
        peak = cb.speed_monitor.peak_flops
        if peak == "auto":
            peak = device_peak_flops(precision)
        callbacks.append(SpeedMonitor(window_size=cb.speed_monitor.window_size, gpu_flops_available=peak))
    ffn = cfg.model.dbrx.ffn_config
    if ffn.moe_loss_scope == "global" or ffn.moe_bias_update_rate > 0:
        log_interval = cb.expert_load.log_interval if cb.expert_load is not None else 10
        callbacks.append(
            RouterBalance(ffn.moe_loss_scope == "global", ffn.moe_bias_update_rate, log_interval)
        )
    if cb.expert_load is not None:
        el = cb.expert_load
        callbacks.append(
            ExpertLoadMonitor(
                el.log_interval,
                el.collapse_fraction,
                el.collapse_window,
                el.imbalance_window,
                el.imbalance_rise,
            )
        )
    if cb.lr_monitor is not None:
        callbacks.append(LRMonitor())
    if cb.memory_monitor is not None and torch.cuda.is_available():
        callbacks.append(MemoryMonitor())
    if cb.runtime_estimator is not None:
        callbacks.append(RuntimeEstimator())
    if cb.sample_log is not None and save_folder is not None:
        callbacks.append(SampleLog(Path(save_folder) / "samples.jsonl"))
    return callbacks


def build_hf_export(cfg: TrainConfig, save_folder: str | None = None) -> HFExport | None:
    """Placed after the CheckpointManager: an export that fails (e.g. a full disk) must not cost the
    checkpoint of the same batch."""
    hf = cfg.callbacks.hf_export
    if hf is None:
        return None
    peft = cfg.model.peft_config
    adapters = None
    if peft is not None:
        adapters = AdapterExport(
            peft.spec,
            str(cfg.model.pretrained),
            hf.adapters in ("merged", "both"),
            hf.adapters in ("peft", "both"),
        )
    return HFExport(
        hf_export_folder(cfg, save_folder),
        hf.save_interval,
        hf.dtype,
        hf.max_shard_size,
        hf.tokenizer,
        hf.drop_expert_bias,
        adapters,
    )


def hf_export_folder(cfg: TrainConfig, save_folder: str | None) -> str:
    """callbacks.hf_export.folder with {save_folder} (the local run folder) and {run_name} filled in."""
    return cfg.callbacks.hf_export.folder.format(save_folder=save_folder, run_name=cfg.run_name)
