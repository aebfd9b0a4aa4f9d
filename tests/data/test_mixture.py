"""Curriculum schedules: segment plans, exact per-stream counts from real loaders, config errors."""

from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.finetuning import FinetuningLoaderConfig
from dbrx_train.data.mixture import CurriculumConfig, MixPhaseConfig, Segment, plan_segments, split_samples
from dbrx_train.data.prepare import pack_to_mds, tokenize_documents
from dbrx_train.data.text import StreamConfig, TextDatasetConfig, TextLoaderConfig, build_text_dataloader

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "yamls/pretrain/dbrx-tiny.yaml"
FINETUNE = REPO / "yamls/finetune.yaml"
STREAMS = ["prose", "code"]


def curriculum(*phases, **kwargs) -> CurriculumConfig:
    return CurriculumConfig(phases=[MixPhaseConfig(start, mix) for start, mix in phases], **kwargs)


def plan(cfg: CurriculumConfig, max_duration="100ba", gbs=8, seq=64) -> list[Segment]:
    return plan_segments(cfg, STREAMS, max_duration=max_duration, global_batch_size=gbs, max_seq_len=seq)


def test_step_schedule_in_every_unit():
    # 0.3dur = 30 batches = 240 samples = 15360 tokens: all the same boundary
    for start in ("30ba", "240sp", "15360tok", "0.3dur"):
        segments = plan(curriculum(("0ba", {"prose": 3, "code": 1}), (start, {"code": 1})))
        assert [(s.start_batch, s.end_batch) for s in segments] == [(0, 30), (30, 100)]
        assert segments[0].mix == {"prose": 0.75, "code": 0.25} and segments[1].mix == {
            "prose": 0.0,
            "code": 1.0,
        }
        assert segments[0].samples == {"prose": 180, "code": 60} and segments[1].samples == {
            "prose": 0,
            "code": 560,
        }
    # max_duration in tokens or samples converts the same way
    assert plan(curriculum(("0ba", {"prose": 1})), max_duration="51200tok")[0].end_batch == 100


def test_linear_schedule_moves_in_constant_steps():
    cfg = curriculum(
        ("0dur", {"prose": 0.8, "code": 0.2}),
        ("0.2dur", {"prose": 0.8, "code": 0.2}),
        ("0.6dur", {"prose": 0.2, "code": 0.8}),
        interpolation="linear",
        step="10ba",
    )
    segments = plan(cfg)
    assert [(s.start_batch, s.end_batch) for s in segments] == [
        (0, 20), (20, 30), (30, 40), (40, 50), (50, 60), (60, 100),
    ]  # fmt: skip
    # midpoints of the ramp 20..60: t = 1/8, 3/8, 5/8, 7/8
    assert [s.mix["prose"] for s in segments] == pytest.approx([0.8, 0.725, 0.575, 0.425, 0.275, 0.2])
    for s in segments:
        assert sum(s.samples.values()) == s.num_batches * 8
        for name in STREAMS:
            assert abs(s.samples[name] - s.mix[name] * s.num_batches * 8) <= 1


def test_short_runs_drop_superseded_and_unreached_phases():
    cfg = curriculum(("0dur", {"prose": 1}), ("0.25dur", {"code": 1}), ("0.9dur", {"prose": 1, "code": 1}))
    # 3 batches: 0.25dur -> batch 0 supersedes phase 0; 0.9dur -> batch 2
    assert [(s.start_batch, s.mix["prose"]) for s in plan(cfg, max_duration="3ba")] == [(0, 0.0), (2, 0.5)]
    unreached = curriculum(("0ba", {"prose": 1}), ("100ba", {"code": 1}))
    assert [(s.start_batch, s.end_batch) for s in plan(unreached)] == [(0, 100)]


def test_split_samples_is_exact_and_deterministic():
    assert split_samples({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    assert split_samples({"a": 0.0, "b": 1.0}, 7) == {"a": 0, "b": 7}


@pytest.mark.parametrize(
    "phases,kwargs,message",
    [
        ([("5ba", {"prose": 1})], {}, r"phases\[0\].start must be 0"),
        (
            [("0ba", {"prose": 1}), ("9ba", {"code": 1}), ("8ba", {"code": 1})],
            {},
            r"phases\[2\].start .* comes before",
        ),
        ([("0ba", {"pros": 1})], {}, r"phases\[0\].mix.pros: no such stream .*did you mean 'prose'"),
        ([("0ba", {"prose": 0})], {}, r"weights sum to 0"),
        ([("0ba", {"prose": -1, "code": 2})], {}, r"must be >= 0"),
        ([("0ep", {"prose": 1})], {}, r"epochs are not a unit"),
        ([("0ba", {"prose": 1}), ("1.5dur", {"code": 1})], {}, r"must lie in \[0, 1\]"),
        (
            [("0ba", {"prose": 1}), ("50ba", {"code": 1})],
            {"interpolation": "linear", "step": "0ba"},
            "less than one",
        ),
    ],
)
def test_schedule_errors_name_the_key(phases, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(curriculum(*phases, **kwargs))


def test_max_duration_in_epochs_is_refused():
    with pytest.raises(ValueError, match="max_duration in ba, sp or tok"):
        plan(curriculum(("0ba", {"prose": 1})), max_duration="2ep")


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    texts = {
        "prose": [topics[n] for n in sorted(topics)[:10]],
        "code": [Path(pytest.__file__).read_text()] * 3,
    }
    for name, docs in texts.items():
        pack_to_mds(tokenize_documents(docs), root / name, max_seq_len=32, progress=False)
    return {name: root / name for name in texts}


def test_loader_with_segment_counts_yields_exactly_the_planned_samples(streams):
    """One segment = one Streaming epoch with `choose` per stream: counted per sample, exact."""
    cfg = TextLoaderConfig(
        dataset=TextDatasetConfig(
            streams={name: StreamConfig(local=str(path)) for name, path in streams.items()}
        )
    )
    (segment,) = plan(curriculum(("0ba", {"prose": 0.3, "code": 0.7})), max_duration="25ba")
    loader = build_text_dataloader(
        cfg, device_batch_size=8, max_seq_len=32, vocab_size=100352, seed=3, choose=segment.samples
    )
    batches = list(loader)
    assert len(batches) == 25
    counts = Counter(i for batch in batches for i in batch["stream_id"].tolist())
    assert {STREAMS[i]: n for i, n in counts.items()} == segment.samples == {"prose": 60, "code": 140}
    # within ±2% of the plan in every stretch of 10 batches too (Streaming shuffles the mixed epoch)
    for start in range(0, 20, 10):
        window = [i for batch in batches[start : start + 10] for i in batch["stream_id"].tolist()]
        assert abs(window.count(0) / len(window) - 0.3) < 0.1


def test_config_keys(tmp_path):
    cfg = load_config(TINY, ["max_duration=40ba"])
    assert cfg.curriculum is not None and cfg.curriculum.interpolation == "linear"
    assert isinstance(load_config(FINETUNE).train_loader, FinetuningLoaderConfig)
    with pytest.raises(
        ConfigError, match=r"'train_loader.name' must be one of 'text', 'finetuning'; got 'chat'"
    ):
        load_config(TINY, ["train_loader.name=chat"])
    with pytest.raises(ConfigError, match=r"remove 'proportion' from train_loader.dataset.streams prose"):
        load_config(TINY, ["train_loader.dataset.streams.prose.proportion=0.5"])
    with pytest.raises(ConfigError, match=r"curriculum.phases\[0\].mix.cod: no such stream"):
        load_config(TINY, ["curriculum.phases=[{start: 0ba, mix: {cod: 1}}]"])
    with pytest.raises(ConfigError, match="max_duration in ba, sp or tok"):
        load_config(TINY, ["max_duration=1ep"])
    # a finetuning loader's unknown key is reported against the finetuning schema
    with pytest.raises(ConfigError, match=r"unknown config key 'train_loader.dataset.locl'"):
        load_config(FINETUNE, ["train_loader.dataset.locl=x"])
