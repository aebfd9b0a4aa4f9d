"""The fault suite's tally, printed after the test session: how many cases ended each way.

Each case records its outcome as a user property of its test report: reports reach the process that
prints the summary also when pytest-xdist workers ran the cases."""

from __future__ import annotations

OUTCOME_PROPERTY = "fault_outcome"
_outcomes: dict[str, str] = {}  # case name -> outcome, in the process that prints the summary


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == OUTCOME_PROPERTY:
            name, outcome = value
            _outcomes[name] = outcome


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.faults.harness import OUTCOMES

    if _outcomes:
        counts = ", ".join(f"{o} {sum(1 for v in _outcomes.values() if v == o)}" for o in OUTCOMES)
        terminalreporter.write_line(f"fault suite: {len(_outcomes)} cases: {counts}")
