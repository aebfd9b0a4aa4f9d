"""The fault suite's tally, printed after the test session: how many cases ended each way."""

from __future__ import annotations

import pytest

TALLY = pytest.StashKey[dict]()  # case name -> outcome


@pytest.fixture
def tally(request) -> dict:
    return request.config.stash.setdefault(TALLY, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.faults.harness import OUTCOMES

    outcomes = config.stash.get(TALLY, {})
    if outcomes:
        counts = ", ".join(f"{o} {sum(1 for v in outcomes.values() if v == o)}" for o in OUTCOMES)
        terminalreporter.write_line(f"fault suite: {len(outcomes)} cases: {counts}")
