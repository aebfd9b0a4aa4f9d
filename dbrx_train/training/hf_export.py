"""`callbacks.hf_export`: write an HF DBRX folder every `save_interval` and at the end of training.

Every rank takes part in gathering the full state dict (FSDP2 shards are all-gathered;
`cpu_offload=True` keeps the result on rank 0 only, in CPU memory); rank 0 then streams it to
`{folder}/ba{N}/` tensor by tensor (config.json, generation_config.json, safetensors shards +
index, tokenizer files), and all ranks wait for it. Works the same without FSDP and at any world
size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dbrx_train.model.hf import save_hf_folder

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class HFExport(Callback):
    def __init__(
        self,
        folder: str,
        save_interval: str = "1000ba",
        dtype: str = "bf16",
        max_shard_bytes: int = 5 * 1024**3,
        tokenizer: bool = True,
    ):
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
        self.max_shard_bytes = max_shard_bytes
        self.tokenizer = tokenizer
        self.should_export = create_interval_scheduler(save_interval)
        self.last_exported_batch = -1

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export(state, Event.BATCH_CHECKPOINT):
            self.export(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.should_export(state, Event.EPOCH_CHECKPOINT):
            self.export(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.export(state)  # no-op when the last batch was just exported

    def export(self, state: State) -> Path | None:
        batch = int(state.timestamp.batch)
        if batch == self.last_exported_batch:
            return None
        self.last_exported_batch = batch
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(state.model, options=options)  # collective: all ranks
        out = self.folder / f"ba{batch}"
        if dist.get_global_rank() == 0:
            # The ComposerModel holds our DbrxForCausalLM as `.model`: drop that prefix.
            weights = {name.removeprefix("model."): t for name, t in state_dict.items()}
            save_hf_folder(
                out,
                state.model.model.config,
                {name: t.shape for name, t in weights.items()},
                weights.__getitem__,
                self.dtype,
                self.max_shard_bytes,
                self.tokenizer,
            )
        del state_dict
        dist.barrier()
        return out
