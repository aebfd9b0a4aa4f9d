"""ExpertLoadMonitor's rules: sustained starvation, overload by hand, and the imbalance alarm."""

import pytest
import torch

from dbrx_train.training.expert_load import ExpertLoadMonitor, max_over_mean, over_capacity


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


def test_overload_by_hand():
    counts = torch.tensor([[6, 2, 0, 0], [2, 2, 2, 2]])  # 8 assignments over 4 experts per layer: fair 2
    assert max_over_mean(counts).tolist() == [3.0, 1.0]
    assert over_capacity(counts, 1.0).tolist() == [4.0, 0.0]  # expert 0 holds 6 of its 2 places
    assert over_capacity(counts, 1.25).tolist() == [3.5, 0.0]  # capacity 2.5


def test_imbalance_alarm_needs_a_falling_balancing_loss_and_a_rising_overload_over_the_window():
    monitor = ExpertLoadMonitor(log_interval=10, imbalance_window=30, imbalance_rise=0.1)
    falling, rising = [1.10, 1.08, 1.06, 1.04], [1.5, 1.7, 1.9, 2.1]
    with pytest.warns(UserWarning, match="layer 0's load-balancing loss fell"):
        alarms = [monitor._track_imbalance(0, 10 * (i + 1), falling[i], rising[i]) for i in range(4)]
    assert alarms == [False, False, False, True]  # only once the window (30 batches) is covered
    steady = ExpertLoadMonitor(log_interval=10, imbalance_window=30)
    # overload rising with the balancing loss is what the loss already shows: no alarm
    assert not any(steady._track_imbalance(0, 10 * (i + 1), 1 + r / 10, r) for i, r in enumerate(rising))
