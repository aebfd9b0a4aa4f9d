"""The expert-collapse rule of ExpertLoadMonitor: sustained, not momentary, starvation is reported."""

import pytest

from dbrx_train.training.expert_load import ExpertLoadMonitor


def loads(starved: float, num_experts: int = 4) -> list[float]:
    rest = (1 - starved) / (num_experts - 1)
    return [starved] + [rest] * (num_experts - 1)


def test_collapse_needs_a_sustained_window():
    monitor = ExpertLoadMonitor(log_interval=10, collapse_fraction=0.1, collapse_window=30)
    fair = 0.25
    with pytest.warns(UserWarning, match="layer 0 expert 0"):
        counts = [monitor._track_collapse(0, loads(0.05 * fair), batch) for batch in (10, 20, 30)]
    assert counts == [0, 0, 1]  # below 10% of fair share since batch 0: reported once 30 batches old


def test_recovery_resets_the_window():
    monitor = ExpertLoadMonitor(log_interval=10, collapse_fraction=0.1, collapse_window=30)
    starved, healthy = loads(0.01), loads(0.2)
    counts = [
        monitor._track_collapse(0, f, b)
        for f, b in ((starved, 10), (starved, 20), (healthy, 30), (starved, 40))
    ]
    assert counts == [0, 0, 0, 0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="collapse_fraction"):
        ExpertLoadMonitor(collapse_fraction=1.5)
