"""``composer train.py <yaml> [key=value ...]``: config -> preflight -> start -> model -> data -> callbacks
-> Trainer.fit. Only the assembly lives here: each step is a call into the module that owns it."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import torch
from composer import Trainer
from composer.core import Evaluator, Event
from composer.utils import create_interval_scheduler, dist, reproducibility
from composer.utils.parallelism import ParallelismConfig
from omegaconf import OmegaConf

from dbrx_train.checkpoint.adapters import base_record, check_resume_base
from dbrx_train.checkpoint.hf_export import HFExport, HFExportError
from dbrx_train.checkpoint.rank_zero import on_rank0
from dbrx_train.checkpoint.remote import RemoteCheckpoints
from dbrx_train.checkpoint.run_lock import RunLockError, lock_run_folder
from dbrx_train.checkpoint.safe_load import restricted_loading
from dbrx_train.checkpoint.saver import (
    CheckpointManager,
    CheckpointSaveError,
)
from dbrx_train.checkpoint.start import Start, choose_start, remove_replaced_runs
from dbrx_train.checkpoint.store import CheckpointError, list_checkpoints
from dbrx_train.config.run import (
    BatchLayout,
    TrainConfig,
    batch_layout,
    load_config,
    resolved_dict,
)
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.integrity import ShardReadError, error_text
from dbrx_train.data.loaders import build_dataloader
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.compile import compile_regions
from dbrx_train.model.hf import load_hf_weights
from dbrx_train.model.lora import apply_lora
from dbrx_train.model.moe import MegaBlocksBackend, MoEBackend
from dbrx_train.model.stats import count_params
from dbrx_train.report.run_report import write_report
from dbrx_train.training import fatal
from dbrx_train.training.builders import (
    build_algorithms,
    build_callbacks,
    build_hf_export,
    build_loggers,
    build_optimizer,
    build_scheduler,
)
from dbrx_train.training.callbacks import BatchSeededRNG
from dbrx_train.training.composer_env import skip_cpu_model_probe
from dbrx_train.training.composer_model import DbrxComposerModel
from dbrx_train.training.cpu import enable_amp_bf16_on_cpu
from dbrx_train.training.curriculum import build_train_data
from dbrx_train.training.icl_eval import ICLEvaluation, build_icl_evaluation
from dbrx_train.training.nonfinite import exit_if_stopped, guard_of
from dbrx_train.training.parallelize import (
    apply_expert_parallelism,
    build_parallelism_config,
    expert_parallel_degree,
    hold_frozen_base,
    mark_fsdp_units,
)
from dbrx_train.training.preemption import PreemptionHandler
from dbrx_train.training.preflight import (
    check_checkpoint_space,
    check_config,
    evaluation_off,
    resolve_device,
    resolve_precision,
)
from dbrx_train.training.pretrained_shards import ShardLoader, load_pretrained_shards

log = logging.getLogger("dbrx_train")

USAGE = "usage: composer train.py <config.yaml> [key=value ...]   (or: python train.py ...)"


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else argv
    # Composer's import made Ctrl-C a silent SystemExit(130): until training starts (and preemption.py
    # takes over), it is a KeyboardInterrupt that says what happened.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    try:
        cfg = load_config(argv[0], argv[1:])
        device = resolve_device(cfg)
        layout = batch_layout(cfg, dist.get_world_size(), device)
        moe_backend = check_config(cfg, device, layout.world_size)
    except ConfigError as e:
        config_error_exit(e)
    if dist.get_global_rank() == 0:  # once, not once per rank
        for note in [*(cfg.foundry.notes() if cfg.foundry else []), *(f"warning: {n}" for n in layout.notes)]:
            print(f"dbrx-train: {note}", file=sys.stderr, flush=True)
    try:
        return train(cfg, layout, device, moe_backend)
    except Refused as e:
        fatal.end_run(str(e), 2, collective=True)
    except (ConfigError, CheckpointError) as e:
        fatal.end_run(str(e), 2, collective=False)
    except HFExportError as e:
        fatal.end_run(str(e), 1, collective=True)
    except (CheckpointSaveError, ShardReadError) as e:
        fatal.end_run(str(e), 1, collective=False)
    except KeyboardInterrupt:
        fatal.end_run(
            "interrupted (Ctrl-C) before training started: nothing was trained or saved",
            130,
            collective=False,
        )
    except Exception as e:
        if fatal.is_peer_failure(e):
            fatal.end_after_peer_failure()
        raise


class Refused(ValueError):
    """The run is refused before training, by a decision every rank made together (printed once)."""


# A rank other than 0 waits this long before printing its own copy of a config error: rank 0
# prints it, exits 2 and the launcher stops the others, so the console shows it once. A rank
# that alone found the problem (a file missing on its node) still says so after the wait.
OTHER_RANKS_WAIT_S = 10.0


def config_error_exit(error: ConfigError) -> NoReturn:
    """The config is parsed before any process group exists, on every rank: one message, exit 2."""
    if dist.get_global_rank() != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
        print(
            f"dbrx-train: config error (rank {dist.get_global_rank()}): {error}", file=sys.stderr, flush=True
        )
    else:
        print(f"dbrx-train: config error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def train(cfg: TrainConfig, layout: BatchLayout, device: str, moe_backend: MoEBackend) -> Trainer:
    # Our own INFO lines (backend, checkpoints saved); Composer's and Streaming's only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    precision = resolve_precision(cfg, device)
    if device == "cpu" and precision == "amp_bf16":
        enable_amp_bf16_on_cpu()  # Composer 0.32 refuses it on CPU; bf16 GEMMs are 2-4x faster there
    skip_cpu_model_probe()  # ~1 s of every rank's start, for a value Composer discards
    log.info("precision: %s (config: %s)", precision, cfg.precision)
    if cfg.fsdp is not None or layout.world_size > 1:
        dist.initialize_dist(device, cfg.dist_timeout)
    run_name = cfg.run_name or shared_run_name()
    save_folder = (cfg.save_folder or "runs/{run_name}").format(run_name=run_name)
    # From here on every builder sees the run's actual name and folder.
    cfg = dataclasses.replace(cfg, run_name=run_name, save_folder=save_folder)
    resolved = resolved_dict(cfg)
    # An object-store save_folder: checkpoints are written in runs/{run_name} first, then uploaded.
    try:
        remote = RemoteCheckpoints(save_folder) if "://" in save_folder else None
    except Exception as e:  # an unknown scheme, a missing client library (boto3, ...)
        raise Refused(
            f"save_folder {save_folder}: cannot open it as an object store ({error_text(e)})"
        ) from None
    run_folder = f"runs/{run_name}" if remote is not None else save_folder
    try:
        lock = lock_run_folder(Path(run_folder))
    except RunLockError as e:
        raise Refused(str(e)) from None
    try:
        return train_holding_lock(cfg, layout, device, precision, moe_backend, run_folder, resolved, remote)
    finally:
        lock.release()


def train_holding_lock(
    cfg: TrainConfig,
    layout: BatchLayout,
    device: str,
    precision: str,
    moe_backend: MoEBackend,
    run_folder: str,
    resolved: dict,
    remote: RemoteCheckpoints | None,
) -> Trainer:
    try:
        start = choose_start(cfg, Path(run_folder), resolved, remote)
        base = base_record(cfg.model.pretrained) if cfg.model.peft_config is not None else None
        check_resume_base(start, base)  # a LoRA checkpoint holds no base: model.pretrained must be its own
    except (ConfigError, CheckpointError) as e:
        raise Refused(str(e)) from None
    write_resolved_config(resolved, run_folder)
    icl = build_icl_evaluation(cfg, layout)

    model, parallelism, shards = assemble_model(cfg, moe_backend, precision, device)
    composer_model = DbrxComposerModel(model)
    optimizer = build_optimizer(cfg, [p for p in composer_model.parameters() if p.requires_grad])
    try:
        check_checkpoint_space(cfg, Path(run_folder), model, start)
    except ConfigError as e:
        raise Refused(str(e)) from None

    try:
        train_loader, data_callbacks = build_train_data(cfg, layout)
        evaluators = build_evaluators(cfg, layout, list(composer_model.get_metrics()))
    except ShardReadError:
        raise  # what one rank read (e.g. a remote stream's index): reported by that rank
    except ValueError as e:
        # The data and the config do not fit (e.g. fewer samples than a batch): the same on every rank.
        raise Refused(str(e)) from None

    checkpoints = CheckpointManager(
        run_folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, resolved, remote, base
    )
    preemption = PreemptionHandler()
    if icl is not None:
        icl.due = preemption.unless_stopped(icl.due)
    hf_export = build_hf_export(cfg, run_folder)
    # Composer loads start.load_path while building the Trainer: no pickled code from it can run.
    with restricted_loading():
        trainer = Trainer(
            run_name=cfg.run_name,
            seed=cfg.seed,
            model=composer_model,
            train_dataloader=train_loader,
            eval_dataloader=evaluators or None,
            # without evaluators Composer ignores it (and warns of a schedule function): the plain value
            eval_interval=eval_schedule(cfg, preemption) if evaluators else cfg.eval_interval,
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
                *build_callbacks(cfg, run_folder, precision),
                *data_callbacks,
                *([icl] if icl is not None else []),
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
            # A LoRA checkpoint holds no base weights; DbrxComposerModel.load_state_dict checks its adapters.
            load_strict_model_weights=cfg.model.peft_config is None,
            dist_timeout=cfg.dist_timeout,
        )
    if shards is not None:
        shards.check_done()
    trainer.logger.log_hyperparameters(resolved)  # the whole resolved config, e.g. into W&B's run config
    if already_finished(trainer):
        finish_without_training(trainer, hf_export, start)
        forget_replaced_runs(Path(run_folder))
        return trainer
    fit_to_the_end(trainer, cfg, run_folder, bool(evaluators), icl, preemption, checkpoints)
    return trainer


def assemble_model(
    cfg: TrainConfig, moe_backend: MoEBackend, precision: str, device: str
) -> tuple[DbrxForCausalLM, ParallelismConfig | None, ShardLoader | None]:
    """The model, in this order: weights (or meta), adapters, compiled regions, expert parallelism,
    FSDP units; with the FSDP2 config Composer applies and, for a meta start, each rank's shard reader."""
    model = build_model(cfg, moe_backend)
    if cfg.model.peft_config is not None:
        adapt(model, cfg, precision)
    if cfg.compile_config is not None:  # before FSDP and activation checkpointing wrap it
        c = cfg.compile_config
        compile_regions(model, c.regions, mode=c.mode, dynamic=c.dynamic)
    device_type = "cuda" if device == "gpu" else "cpu"
    if (degree := expert_parallel_degree(cfg.fsdp)) > 1:
        swapped = apply_expert_parallelism(model, cfg.fsdp, precision, device_type)
        log.info(
            "expert parallelism: %d MoE layers, %d experts per rank (the torch backend's code)",
            swapped,
            cfg.model.dbrx.ffn_config.moe_num_experts // degree,
        )
    parallelism = None
    if cfg.fsdp is not None:
        mark_fsdp_units(model)
        parallelism = build_parallelism_config(cfg.fsdp, device_type)
    shards = None
    if cfg.model.init_device == "meta" and cfg.model.pretrained:  # each rank reads its shard, in Trainer()
        shards = load_pretrained_shards(model, cfg.model.pretrained, device_type)
    return model, parallelism, shards


def build_evaluators(cfg: TrainConfig, layout: BatchLayout, metric_names: list[str]) -> list[Evaluator]:
    """The eval loader's Evaluator (none without an eval_loader, or with evaluation off)."""
    if cfg.eval_loader is None or evaluation_off(cfg):
        return []
    eval_loader = build_dataloader(
        cfg.eval_loader,
        device_batch_size=layout.device_eval_batch_size,
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.model.dbrx.vocab_size,
        seed=cfg.seed,
        config_key="eval_loader",
    )
    return [Evaluator(label="eval", dataloader=eval_loader, metric_names=metric_names)]


def eval_schedule(cfg: TrainConfig, preemption: PreemptionHandler):
    """Every eval_interval and at the end, except the end of a run stopped by a signal."""
    return preemption.unless_stopped(
        create_interval_scheduler(cfg.eval_interval, checkpoint_events=False, final_events={Event.FIT_END})
    )


def fit_to_the_end(
    trainer: Trainer,
    cfg: TrainConfig,
    run_folder: str,
    with_eval: bool,
    icl: ICLEvaluation | None,
    preemption: PreemptionHandler,
    checkpoints: CheckpointManager,
) -> None:
    """Train (after a baseline evaluation if asked), then say how the run ended: its summary, and the
    exit code of a run stopped by a non-finite loss (3) or a signal (130 or 143)."""
    started = time.monotonic()
    if cfg.eval_first and int(trainer.state.timestamp.batch) == 0:  # a baseline (not again when resuming)
        if with_eval:
            trainer.eval()
        if icl is not None:
            icl.evaluate(trainer.state, trainer.logger)
    trainer.fit()
    guard = guard_of(trainer)
    stopped_early = preemption.stopped_at_batch is not None or (guard is not None and guard.stopped_at_batch)
    print_summary(trainer, run_folder, time.monotonic() - started, stopped_early=bool(stopped_early), icl=icl)
    exit_if_stopped(trainer)  # a non-finite loss stopped the run: say where and why, exit code 3
    if preemption.stopped_at_batch is not None:
        if dist.get_global_rank() == 0:
            print(
                preemption.stop_message(checkpoints.saved[-1].path if checkpoints.saved else None), flush=True
            )
        raise SystemExit(preemption.exit_code)
    if already_finished(trainer):
        forget_replaced_runs(Path(run_folder))


def forget_replaced_runs(run_folder: Path) -> None:
    """The run in this folder is complete: the runs it replaced (save_overwrite) can go now."""
    removed = on_rank0(lambda: remove_replaced_runs(run_folder))
    if removed and dist.get_global_rank() == 0:
        print(f"dbrx-train: removed the run(s) this one replaced: {', '.join(map(str, removed))}", flush=True)


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


def shared_run_name() -> str:
    name = [datetime.datetime.now().strftime("dbrx-%Y%m%d-%H%M%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(name)  # every rank must agree on the run folder
    return name[0]


def build_model(cfg: TrainConfig, moe_backend: MoEBackend) -> DbrxForCausalLM:
    """Weights from the run seed, so every rank that builds them builds the same ones; every MoE layer's
    experts from `moe_backend` (resolved by preflight for the run's device)."""
    reproducibility.seed_all(cfg.seed)
    init_device = cfg.model.init_device
    on_meta = init_device == "meta" or (init_device == "mixed" and dist.get_global_rank() != 0)
    pretrained = cfg.model.pretrained
    with torch.device("meta" if on_meta or pretrained else "cpu"):
        model = DbrxForCausalLM(cfg.model.dbrx, moe_backend)
    if pretrained and not on_meta:
        # No random init to overwrite: allocate, fill the RoPE buffers, copy tensor by tensor.
        model.to_empty(device="cpu")
        model.init_non_hf_state()
        load_hf_weights(model, pretrained)
        log.info("loaded pretrained weights from %s", pretrained)
    elif not on_meta:
        model.init_weights()
    counts = count_params(cfg.model.dbrx)
    log.info("DBRX model: %.2fM total / %.2fM active parameters", counts.total / 1e6, counts.active / 1e6)
    log.info(
        "MoE experts: %r, from model.ffn_config.moe_backend: %s",
        moe_backend,
        cfg.model.dbrx.ffn_config.moe_backend,
    )
    return model


def adapt(model: DbrxForCausalLM, cfg: TrainConfig, precision: str) -> None:
    """model.peft_config: freeze the base, add the adapters, and say what trains and how."""
    peft = cfg.model.peft_config
    apply_lora(model, peft.spec)
    base_dtype = hold_frozen_base(model, cfg.fsdp, precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d lora_alpha=%g on %s: %s trainable of %s parameters (%.3f%%); frozen base in %s",
        peft.r,
        peft.lora_alpha,
        ", ".join(peft.target_modules),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        base_dtype or "its own dtype (fp32)",
    )
    if peft.expert_targets:
        log.info(
            "LoRA: adapted experts (%s) run the torch path, per-expert matmuls under autograd, for the base "
            "and the adapters alike%s",
            ", ".join(peft.expert_targets),
            "; MegaBlocks' grouped GEMMs are not used for them"
            if isinstance(model.moe_backend, MegaBlocksBackend)
            else "",
        )


def write_resolved_config(resolved: dict, run_folder: str) -> None:
    if dist.get_global_rank() != 0:
        return
    folder = Path(run_folder)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), folder / "config.yaml")


def print_summary(
    trainer: Trainer,
    run_folder: str,
    seconds: float,
    *,
    stopped_early: bool = False,
    icl: ICLEvaluation | None = None,
) -> None:
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
    if icl is not None:
        lines += icl.summary_lines()
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
