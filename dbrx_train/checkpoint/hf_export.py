"""`callbacks.hf_export`: write an HF DBRX folder every `save_interval` and at the end of training.

Every rank takes part in gathering the full state dict (FSDP2 shards are all-gathered;
`cpu_offload=True` keeps the result on rank 0 only, in CPU memory); rank 0 then streams it to
`{folder}/ba{N}/` tensor by tensor (config.json, generation_config.json, safetensors shards +
index, tokenizer files), and all ranks wait for it. Works the same without FSDP and at any world
size.

An export is written into `.tmp-ba{N}-<id>/`, fsynced, and renamed to `ba{N}/`, so a `ba{N}` folder
is always complete (a crash or a full disk leaves only a temporary, removed at the next export).
It runs after the CheckpointManager (train.py), so a failed export never costs the checkpoint of
its batch; its error reaches every rank (no rank waits for a rank 0 that failed) and the run stops
with one line naming the folder.

A LoRA run gathers only its adapters; rank 0 folds them into the base read from `model.pretrained`
(`ba{N}/`, a plain DBRX folder) and/or writes them as a PEFT folder (`ba{N}/adapters/`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dbrx_train.atomic import swap_in
from dbrx_train.checkpoint.rank_zero import RankError, on_rank0
from dbrx_train.checkpoint.store import TMP_PREFIX, temp_folder
from dbrx_train.model.dbrx import describe_topk_change, topk_change_without_expert_bias
from dbrx_train.model.hf import EXPORT_DTYPES, ExpertBiasError, save_hf_folder
from dbrx_train.model.lora import LoraSpec
from dbrx_train.model.lora_export import save_merged_folder, write_peft_folder

PEFT_SUBFOLDER = "adapters"


class HFExportError(RuntimeError):
    """An HF export could not be written; training checkpoints (written before it) are unaffected."""


class AdapterExport(NamedTuple):
    """How a LoRA run exports (callbacks.hf_export.adapters)."""

    spec: LoraSpec
    base_folder: str  # model.pretrained: the frozen base the adapters are folded into
    merged: bool  # ba{N}/: a plain DBRX folder with the adapters folded in
    peft: bool  # ba{N}/adapters/: a PEFT adapter folder


class HFExport(Callback):
    def __init__(
        self,
        folder: str,
        save_interval: str = "1000ba",
        dtype: str = "bf16",
        max_shard_bytes: int = 5 * 1024**3,
        tokenizer: bool = True,
        drop_expert_bias: bool = False,
        adapters: AdapterExport | None = None,
    ):
        self.folder = Path(folder)
        self.drop_expert_bias = drop_expert_bias
        self._heldout: dict | None = None  # the first eval batch, for the top-k change of dropping biases
        self.adapters = adapters
        self.dtype = EXPORT_DTYPES[dtype]
        self.max_shard_bytes = max_shard_bytes
        self.tokenizer = tokenizer
        self.should_export = create_interval_scheduler(save_interval)
        self.last_exported_batch = -1

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.drop_expert_bias and state.evaluators:
            batch = next(iter(state.evaluators[0].dataloader.dataloader))
            self._heldout = {k: v for k, v in batch.items() if k in ("input_ids", "sequence_id")}

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export(state, Event.BATCH_CHECKPOINT):
            self.export(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export(state, Event.EPOCH_CHECKPOINT):
            self.export(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.export(state)  # no-op when the last batch was just exported

    def export_folder(self, batch: int) -> Path:
        return self.folder / f"ba{batch}"

    def export(self, state: State) -> Path | None:
        batch = int(state.timestamp.batch)
        if batch == self.last_exported_batch:
            return None
        self.last_exported_batch = batch
        biased = self.drop_expert_bias and any(
            b.any() for name, b in state.model.named_buffers() if name.endswith("expert_bias")
        )
        if biased and self._heldout is not None:
            self._report_topk_change(state, batch)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # Collective: all ranks. Only the adapters for a LoRA run (DbrxComposerModel.state_dict).
        state_dict = get_model_state_dict(state.model, options=options)
        out = self.export_folder(batch)
        try:
            on_rank0(lambda: self._write(out, state.model.model.config, state_dict))
        except RankError as e:
            if e.detail.startswith(ExpertBiasError.__name__):
                raise HFExportError(f"HF export {out}: {e.detail}") from e
            raise HFExportError(
                f"HF export {out} could not be written ({e.detail}). Training checkpoints are written before "
                f"exports and are unaffected; free space or fix callbacks.hf_export.folder, then rerun the "
                f"same command with autoresume: true to continue from the latest checkpoint"
            ) from e
        return out  # the full state dict is freed with this frame

    def _write(self, out: Path, config, state_dict: dict[str, torch.Tensor]) -> None:
        """Rank 0: the folder under a temporary name, fsynced, then renamed into place."""
        if self.folder.is_dir():
            for stale in self.folder.glob(f"{TMP_PREFIX}ba*"):  # left by a crashed or failed export
                shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_folder(self.folder, out.name)  # .tmp-ba{N}-<id>
        # The ComposerModel holds our DbrxForCausalLM as `.model`: drop that prefix.
        weights = {name.removeprefix("model."): t for name, t in state_dict.items()}
        try:
            lora = self.adapters
            if lora is None:
                save_hf_folder(
                    tmp,
                    config,
                    {name: t.shape for name, t in weights.items()},
                    weights.__getitem__,
                    self.dtype,
                    self.max_shard_bytes,
                    self.tokenizer,
                    self.drop_expert_bias,
                )
            if lora is not None and lora.merged:
                save_merged_folder(
                    tmp,
                    config,
                    lora.base_folder,
                    lora.spec,
                    weights,
                    self.dtype,
                    self.max_shard_bytes,
                    self.tokenizer,
                )
            if lora is not None and lora.peft:
                write_peft_folder(tmp / PEFT_SUBFOLDER, lora.spec, weights, lora.base_folder, self.dtype)
            swap_in(tmp, out)  # fsynced; replaces the same batch exported again (a run resumed at its end)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _report_topk_change(self, state: State, batch: int) -> None:
        """Every rank routes its held-out batch with and without the biases; rank 0 prints the total."""
        composer_model = state.model
        device_batch = state.device.batch_to_device(dict(self._heldout))
        was_training = composer_model.training
        composer_model.eval()
        try:
            with composer_model.router_only():
                changed = topk_change_without_expert_bias(
                    composer_model, lambda: composer_model(device_batch)
                )
        finally:
            composer_model.train(was_training)
        dist.all_reduce(changed, reduce_operation="SUM")
        if dist.get_global_rank() == 0:
            print(f"dbrx-train: HF export ba{batch}: {describe_topk_change(changed)}", flush=True)
