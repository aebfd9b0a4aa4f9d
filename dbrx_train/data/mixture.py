"""Curriculum data-mix schedules: which share of each named stream to train on, when.

    curriculum:
      interpolation: linear        # or `step` (default): each phase's mix holds until the next
      step: 20ba                   # linear only: the mix changes in constant pieces of this size
      phases:
        - {start: 0ba,     mix: {prose: 0.8, code: 0.2}}
        - {start: 0.25dur, mix: {prose: 0.8, code: 0.2}}
        - {start: 0.75dur, mix: {prose: 0.2, code: 0.8}}

The stream names are those of `train_loader.dataset.streams`. Phase starts are Composer time
strings in batches (`ba`), samples (`sp`), tokens (`tok`, = samples x max_seq_len) or fractions
of `max_duration` (`dur`); they are rounded down to whole batches. Mix weights are normalised
per phase; a stream a phase leaves out gets 0.

The schedule is compiled into *segments*: runs of batches with one constant mix. Each segment is
one Streaming epoch whose size is exactly the segment's samples, with each stream's share given
as an absolute sample count (`Stream(choose=...)`), so the realised mix equals the plan up to
rounding to whole samples, and resumption inside a segment is Streaming's own exact resumption.
Each segment draws its samples afresh from each stream (seeded by run seed + segment index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from dbrx_train.config.schema import closest_key, did_you_mean, parse_time


@dataclass
class MixPhaseConfig:
    start: str  # Composer time: "0ba", "5000sp", "2000000tok", "0.5dur"
    mix: dict[str, float] = field(default_factory=dict)  # stream name -> weight (normalised)


@dataclass
class CurriculumConfig:
    # In order, each `{start: time (ba/sp/tok/dur), mix: {stream: weight}}`: the mix from `start` on;
    # the first starts at 0. Weights are normalised; a stream left out gets 0.
    phases: list[MixPhaseConfig]
    # step: each phase's mix holds until the next starts; linear: it moves to the next phase's mix in `step`s.
    interpolation: Literal["step", "linear"] = "step"
    step: str = "10ba"  # linear: size of each constant piece (same units as `start`)


@dataclass(frozen=True)
class Segment:
    """Batches [start_batch, end_batch) train on one mix; `samples` per stream over all ranks."""

    start_batch: int
    end_batch: int
    mix: dict[str, float]
    samples: dict[str, int]

    @property
    def num_batches(self) -> int:
        return self.end_batch - self.start_batch


def _per_batch(unit: str, global_batch_size: int, max_seq_len: int) -> int:
    """How many of a count unit (ba, sp, tok) one batch holds."""
    return {"ba": 1, "sp": global_batch_size, "tok": global_batch_size * max_seq_len}[unit]


def total_batches(max_duration: str, *, global_batch_size: int, max_seq_len: int) -> int:
    """max_duration in batches (Composer stops at the first batch that reaches it)."""
    time = parse_time(max_duration, "max_duration")
    if time.unit.value in ("ep", "dur"):
        raise ValueError(
            f"a curriculum needs max_duration in ba, sp or tok (each mix segment is one epoch); got {max_duration!r}"
        )
    return math.ceil(time.value / _per_batch(time.unit.value, global_batch_size, max_seq_len))


def to_batches(key: str, value: str, *, total: int, global_batch_size: int, max_seq_len: int) -> int:
    """A phase boundary in whole batches, rounded down."""
    time = parse_time(value, key)
    if time.unit.value == "ep":
        raise ValueError(f"{key}: epochs are not a unit for curriculum times (each mix segment is one epoch)")
    if time.unit.value == "dur":
        if time.value > 1:
            raise ValueError(f"{key}: a fraction of max_duration must lie in [0, 1]; got {value!r}")
        return math.floor(time.value * total + 1e-9)
    return math.floor(time.value / _per_batch(time.unit.value, global_batch_size, max_seq_len) + 1e-9)


def _normalised(key: str, mix: dict[str, float], streams: list[str]) -> dict[str, float]:
    for name, weight in mix.items():
        if name not in streams:
            raise ValueError(
                f"{key}.{name}: no such stream in train_loader.dataset.streams"
                f"{did_you_mean(closest_key(name, streams))}; streams: {streams}"
            )
        if not weight >= 0:
            raise ValueError(f"{key}.{name} is {weight}; mix weights must be >= 0")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"{key}: the weights sum to {total}; give at least one stream a positive weight")
    return {name: mix.get(name, 0.0) / total for name in streams}


def split_samples(mix: dict[str, float], num_samples: int) -> dict[str, int]:
    """Whole samples per stream summing to num_samples, each within 1 of mix x num_samples
    (largest remainder; ties go to the earlier stream, so the split is deterministic)."""
    exact = {name: share * num_samples for name, share in mix.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(mix, key=lambda name: -(exact[name] - counts[name]))
    for name in by_remainder[: num_samples - sum(counts.values())]:
        counts[name] += 1
    return counts


def plan_segments(
    cfg: CurriculumConfig,
    streams: list[str],
    *,
    max_duration: str,
    global_batch_size: int,
    max_seq_len: int,
    key: str = "curriculum",
) -> list[Segment]:
    """The schedule as constant-mix segments covering batches [0, max_duration); errors name the key."""
    if not streams:
        raise ValueError(f"{key} needs named streams: set train_loader.dataset.streams (not `local`)")
    if not cfg.phases:
        raise ValueError(f"{key}.phases is empty; give at least one phase")
    total = total_batches(max_duration, global_batch_size=global_batch_size, max_seq_len=max_seq_len)
    sizes = {"total": total, "global_batch_size": global_batch_size, "max_seq_len": max_seq_len}
    starts = [to_batches(f"{key}.phases[{i}].start", p.start, **sizes) for i, p in enumerate(cfg.phases)]
    mixes = [_normalised(f"{key}.phases[{i}].mix", p.mix, streams) for i, p in enumerate(cfg.phases)]
    if starts[0] != 0:
        raise ValueError(
            f"{key}.phases[0].start must be 0 (the mix at the first batch); got {cfg.phases[0].start!r}"
        )
    for i in range(1, len(starts)):
        if starts[i] < starts[i - 1]:
            raise ValueError(
                f"{key}.phases[{i}].start ({cfg.phases[i].start!r} = batch {starts[i]}) comes before "
                f"phases[{i - 1}].start (batch {starts[i - 1]}); list the phases in order"
            )
    # In a short run (e.g. a smoke test with a small max_duration) fractions can round to the same
    # batch or to the end: a phase that starts where the next one does is superseded by it, and a
    # phase that starts at or after max_duration is never reached.
    kept = [
        i
        for i in range(len(starts))
        if starts[i] < total and (i + 1 == len(starts) or starts[i + 1] > starts[i])
    ]
    starts, mixes = [starts[i] for i in kept], [mixes[i] for i in kept]
    step = None
    if cfg.interpolation == "linear":
        step = to_batches(f"{key}.step", cfg.step, **sizes)
        if step < 1:
            raise ValueError(f"{key}.step is {cfg.step!r}, less than one batch")

    segments: list[Segment] = []
    bounds = [*starts, total]
    for i, mix in enumerate(mixes):
        begin, end = bounds[i], bounds[i + 1]
        if step is None or i == len(mixes) - 1:
            pieces = [(begin, end, mix)]
        else:
            pieces = []
            for piece_start in range(begin, end, step):
                piece_end = min(piece_start + step, end)
                t = ((piece_start + piece_end) / 2 - begin) / (end - begin)  # the piece's midpoint
                between = {name: (1 - t) * mix[name] + t * mixes[i + 1][name] for name in streams}
                pieces.append((piece_start, piece_end, between))
        for piece_start, piece_end, piece_mix in pieces:
            rounded = {name: round(share, 6) for name, share in piece_mix.items()}
            if segments and segments[-1].mix == rounded:  # e.g. a ramp between two equal phases
                piece_start = segments.pop().start_batch
            samples = split_samples(rounded, (piece_end - piece_start) * global_batch_size)
            segments.append(Segment(piece_start, piece_end, rounded, samples))
    return segments
