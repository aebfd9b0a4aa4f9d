"""The train loader, the curriculum that swaps it between mix segments, and the mix monitor.

CurriculumLearning: each segment of the schedule (`data/mixture.py`) is one Composer epoch
served by its own Streaming loader, so the mix changes during one run without a restart. The
loader for epoch k is built at EPOCH_START; after a checkpoint load the loader of the
checkpoint's epoch takes over the Streaming position Composer restored (sample_in_epoch, with
pinned num_canonical_nodes it is valid on any world size), so a resumed run sees exactly the
samples the uninterrupted run would have. The schedule is saved with the callback's state; a
resume whose schedule differs on any segment already started is refused (later segments may
change: they are honoured from the next segment on).

DataMixMonitor logs, every batch, over all ranks: `data/mix/<stream>` (the planned share of
the current loader), `data/samples/<stream>` and `data/tokens/<stream>` (cumulative, realised)
and `data/fingerprint` (an order-free hash of the global batch's samples, to compare runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from streaming import StreamingDataLoader

from dbrx_train.config.run import BatchLayout, TrainConfig
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.loaders import build_dataloader
from dbrx_train.data.mixture import Segment, plan_segments
from dbrx_train.data.text import stream_names

log = logging.getLogger(__name__)

FINGERPRINT_MODULUS = 2**31 - 1


class CurriculumLearning(Callback):
    def __init__(self, segments: list[Segment], make_loader: Callable[[int], StreamingDataLoader]):
        self.segments = segments
        self.make_loader = make_loader
        self.active = 0  # the segment whose loader is state.train_dataloader

    def after_load(self, state: State, logger: Logger) -> None:
        target = int(state.timestamp.epoch)
        if target != self.active and target < len(self.segments):
            # Composer restored the Streaming position into the loader it was given (segment 0's);
            # hand that position to the loader of the checkpoint's segment.
            position = state.train_dataloader.dataset.state_dict(0, False)
            self._activate(state, target)
            state.train_dataloader.dataset.load_state_dict(position)

    def epoch_start(self, state: State, logger: Logger) -> None:
        target = int(state.timestamp.epoch)
        if target >= len(self.segments):
            raise RuntimeError(f"epoch {target} has no curriculum segment ({len(self.segments)} planned)")
        if target != self.active:
            self._activate(state, target)

    def _activate(self, state: State, index: int) -> None:
        segment = self.segments[index]
        log.info("curriculum: batches %d-%d mix %s", segment.start_batch, segment.end_batch, segment.mix)
        loader = self.make_loader(index)
        state.train_dataloader = loader
        state.set_dataloader(loader, "train")
        self.active = index

    def state_dict(self) -> dict[str, Any]:
        return {"segments": [asdict(s) for s in self.segments], "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [Segment(**s) for s in state["segments"]]
        started = state["active"] + 1
        if saved[:started] != self.segments[:started]:
            changed = next(
                i for i in range(started) if i >= len(self.segments) or saved[i] != self.segments[i]
            )
            now = self.segments[changed] if changed < len(self.segments) else "nothing"
            raise ConfigError(
                f"curriculum: the schedule differs from the checkpoint's in a segment already trained "
                f"(segment {changed}: checkpoint {saved[changed]}, now {now}). Changing the past mix "
                f"would silently mix two schedules; only segments after batch {saved[started - 1].end_batch} "
                f"may change. Restore the earlier phases (phases given in `dur` move when max_duration "
                f"changes: give them in `ba` to extend a run), or start a new run (load_weights_only: true)."
            )


class DataMixMonitor(Callback):
    def __init__(self, streams: list[str], curriculum: CurriculumLearning | None = None):
        self.streams = streams
        self.curriculum = curriculum  # its segment's mix is the plan; else the loader's proportions
        self.samples = [0] * len(streams)
        self.tokens = [0] * len(streams)
        self._batch_counts: torch.Tensor | None = None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        # state.batch is the whole device batch here; later it is only the last microbatch.
        batch = state.batch
        ids = batch["input_ids"]
        stream_id = batch["stream_id"].reshape(-1).cpu()
        num = len(self.streams)
        samples = torch.bincount(stream_id, minlength=num)
        counts = torch.cat([samples, samples * ids.shape[1], batch_fingerprint(ids.cpu()).reshape(1)])
        self._batch_counts = counts.to(torch.int64)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._batch_counts is None:
            return
        counts = state.device.tensor_to_device(self._batch_counts)
        dist.all_reduce(counts, reduce_operation="SUM")
        counts = counts.cpu().tolist()
        num = len(self.streams)
        metrics: dict[str, float] = {}
        if self.curriculum is not None:
            mix = self.curriculum.segments[self.curriculum.active].mix
            planned = [mix[name] for name in self.streams]
        else:
            planned = planned_mix(state.train_dataloader, num)
        for i, name in enumerate(self.streams):
            self.samples[i] += counts[i]
            self.tokens[i] += counts[num + i]
            metrics[f"data/mix/{name}"] = planned[i]
            metrics[f"data/samples/{name}"] = self.samples[i]
            metrics[f"data/tokens/{name}"] = self.tokens[i]
        metrics["data/fingerprint"] = counts[-1] % FINGERPRINT_MODULUS
        logger.log_metrics(metrics)
        self._batch_counts = None

    def state_dict(self) -> dict[str, Any]:
        return {"streams": self.streams, "samples": self.samples, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["streams"] == self.streams:
            self.samples, self.tokens = list(state["samples"]), list(state["tokens"])


def batch_fingerprint(ids_BT: torch.Tensor) -> torch.Tensor:
    """Sum over samples of a polynomial hash of each row: equal for two batches that hold the same
    samples in any order or split over any number of ranks (the sum is all-reduced)."""
    positions = torch.arange(ids_BT.shape[1], dtype=torch.int64)
    coefficients = (positions * 2654435761 + 97) % 1_000_003  # < 2**20; ids < 2**17; sums fit int64
    per_sample = (ids_BT.to(torch.int64) * coefficients).sum(dim=1) % FINGERPRINT_MODULUS
    return per_sample.sum()


def planned_mix(loader: Any, num_streams: int) -> list[float]:
    """Each stream's share of the current epoch, as Streaming will draw it."""
    streams = getattr(getattr(loader, "dataset", None), "streams", None)
    if not streams or len(streams) != num_streams:
        return [float("nan")] * num_streams
    choose = [float(stream.choose) for stream in streams]
    total = sum(choose) or 1.0
    return [c / total for c in choose]


def build_train_data(cfg: TrainConfig, layout: BatchLayout) -> tuple[StreamingDataLoader, list[Callback]]:
    """The train loader (the first segment's, with a curriculum) and the data callbacks."""
    loader_kwargs = {
        "device_batch_size": layout.device_train_batch_size,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.model.dbrx.vocab_size,
    }
    streams = stream_names(cfg.train_loader)
    if cfg.curriculum is None:
        callbacks: list[Callback] = [DataMixMonitor(streams)] if streams else []
        return build_dataloader(cfg.train_loader, seed=cfg.seed, **loader_kwargs), callbacks
    segments = plan_segments(
        cfg.curriculum,
        streams,
        max_duration=cfg.max_duration,
        global_batch_size=cfg.global_train_batch_size,
        max_seq_len=cfg.max_seq_len,
    )

    def make_loader(index: int) -> StreamingDataLoader:
        # Its own seed per segment: segments with similar mixes must not redraw the same samples.
        return build_dataloader(
            cfg.train_loader, seed=cfg.seed + index, choose=segments[index].samples, **loader_kwargs
        )

    curriculum = CurriculumLearning(segments, make_loader)
    return make_loader(0), [curriculum, DataMixMonitor(streams, curriculum)]
