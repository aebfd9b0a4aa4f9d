"""Thin ComposerModel around DbrxForCausalLM: loss terms, eval metrics, FLOPs per batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.dbrx import RouterTotals, document_labels, shift_labels
from dbrx_train.model.lora import is_adapter
from dbrx_train.model.stats import flops_per_token
from dbrx_train.vocab import IGNORE_INDEX


class DbrxComposerModel(ComposerModel):
    """Composer owns the loop; this only maps a batch to the model's loss terms and metrics.

    Batches are dicts with ``input_ids`` (B, T), optionally ``labels`` (B, T, -100 = no loss) and
    ``sequence_id`` (B, T: packed documents, -1 on padding).
    """

    def __init__(self, model: DbrxForCausalLM):
        super().__init__()
        self.model = model
        # A model with LoRA adapters saves and loads only them: checkpoints leave out the frozen base,
        # which comes from model.pretrained again. Composer's own name for the switch, which it turns off
        # while it broadcasts rank 0's whole model (init_device: mixed).
        self.should_save_peft_only = any(is_adapter(name) for name, _ in model.named_parameters())
        self._eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }
        # moe_loss_scope global: the step's routing, set by training/router_balance.py before the
        # step's first forward and cleared after its last.
        self.router_totals: RouterTotals | None = None
        self._router_only = False

    @contextlib.contextmanager
    def router_only(self) -> Iterator[None]:
        """Forwards inside return only the router statistics (no lm_head, no LM loss). Called through
        the (FSDP-wrapped) ComposerModel, so every shard is gathered as in a training forward."""
        self._router_only = True
        try:
            yield
        finally:
            self._router_only = False

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        if self.should_save_peft_only:
            for name in [name for name in state if not is_adapter(name)]:
                del state[name]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """With adapters: the base is absent from checkpoints by design, but every adapter must be there."""
        if not self.should_save_peft_only:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [name for name in result.missing_keys if is_adapter(name)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint does not hold this model's LoRA adapters: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        return result

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(
            batch["input_ids"],
            labels=batch.get("labels", batch["input_ids"]),
            sequence_id=batch.get("sequence_id"),
            router_totals=None if self._router_only else self.router_totals,
            router_only=self._router_only,
        )

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Composer logs each key as loss/train/<key>; 'total' is what it backpropagates.
        terms = {
            "total": outputs.loss,
            "lm_cross_entropy": outputs.lm_loss.detach(),
            "load_balancing": outputs.aux_loss.detach(),
        }
        if self.model.config.ffn_config.moe_z_loss_weight > 0:
            terms["router_z_loss"] = outputs.z_loss.detach()
        return terms

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        if outputs is not None:
            return outputs.logits
        return self.model(batch["input_ids"], sequence_id=batch.get("sequence_id")).logits

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        # Train-time cross-entropy already comes from the loss (loss/train/lm_cross_entropy);
        # recomputing it over a 100k vocabulary every batch would cost a second softmax.
        return {} if is_train else self._eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        labels = batch.get("labels", batch["input_ids"])
        if self.model.config.attn_config.attn_uses_sequence_id:
            labels = document_labels(labels, batch.get("sequence_id"))
        metric.update(outputs, shift_labels(labels))

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        batch_size, seq_len = batch["input_ids"].shape
        frozen = self.should_save_peft_only  # LoRA: no gradients for the base weights
        return flops_per_token(self.model.config, seq_len, frozen_weights=frozen) * batch_size * seq_len
