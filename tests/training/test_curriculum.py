"""The curriculum callback's checkpoint contract: a resume may change only segments not yet started."""

from dataclasses import asdict

import pytest
import torch

from dbrx_train.data.mixture import CurriculumConfig, MixPhaseConfig, plan_segments
from dbrx_train.training.curriculum import CurriculumLearning, batch_fingerprint


def callback(*phases) -> CurriculumLearning:
    cfg = CurriculumConfig(phases=[MixPhaseConfig(start, mix) for start, mix in phases])
    segments = plan_segments(cfg, ["prose", "code"], max_duration="30ba", global_batch_size=4, max_seq_len=8)
    return CurriculumLearning(segments, make_loader=lambda index: None)


def saved_at(cb: CurriculumLearning, active: int) -> dict:
    cb.active = active
    return {**cb.state_dict(), "segments": [asdict(s) for s in cb.segments]}


ORIGINAL = (
    ("0ba", {"prose": 0.8, "code": 0.2}),
    ("10ba", {"prose": 0.5, "code": 0.5}),
    ("20ba", {"code": 1}),
)


def test_same_schedule_resumes():
    resumed = callback(*ORIGINAL)
    resumed.load_state_dict(saved_at(callback(*ORIGINAL), active=1))


def test_changing_a_future_segment_is_honoured():
    changed = (*ORIGINAL[:2], ("20ba", {"prose": 1}))
    callback(*changed).load_state_dict(saved_at(callback(*ORIGINAL), active=1))


@pytest.mark.parametrize(
    "changed",
    [
        (("0ba", {"prose": 0.7, "code": 0.3}), *ORIGINAL[1:]),  # a past segment's mix
        (ORIGINAL[0], ("12ba", {"prose": 0.5, "code": 0.5}), ORIGINAL[2]),  # the current one's bounds
        (ORIGINAL[0], ("10ba", {"prose": 0.4, "code": 0.6}), ORIGINAL[2]),  # the current one's mix
    ],
)
def test_changing_a_started_segment_is_refused(changed):
    with pytest.raises(ValueError, match=r"curriculum: the schedule differs .* segment already trained"):
        callback(*changed).load_state_dict(saved_at(callback(*ORIGINAL), active=1))


def test_fingerprint_ignores_order_and_split_but_not_content():
    ids = torch.randint(0, 100352, (6, 16), generator=torch.Generator().manual_seed(0))
    whole = batch_fingerprint(ids)
    assert batch_fingerprint(ids[[3, 1, 5, 0, 2, 4]]) == whole
    assert batch_fingerprint(ids[:2]) + batch_fingerprint(ids[2:]) == whole
    other = ids.clone()
    other[2, 7] += 1
    assert batch_fingerprint(other) != whole
